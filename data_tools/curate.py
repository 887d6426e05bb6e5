"""Curate raw text corpora on Ray with a recipe of stages (exact and near dedup, Gopher and C4
quality rules, language identification, decontamination) into .jsonl.zst shards that
data_tools/shard.py takes as --input.

    python data_tools/curate.py --input corpus/ 'more/*.jsonl.zst' --output data/curated \\
        --recipe recipe.yaml [--num-workers 8] [--ray-address ADDR] [--overwrite]

Recipe (YAML), stages run in the listed order, each with its parameters (defaults: the
published thresholds; unknown stages or parameters are refused):

    stages:
      - exact_dedup: {}
      - gopher_quality: {}
      - gopher_repetition: {}
      - c4_quality: {bad_words_file: badwords.txt}
      - language: {languages: [en], min_score: 0.65}
      - decontaminate: {files: [eval/hellaswag.jsonl], ngram: 13}
      - near_dedup: {threshold: 0.8, num_perm: 128, ngram: 5}

Inputs as shard.py reads them (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, directories,
globs), in sorted-path then record order; empty and binary documents are removed first
(stage 'read'). Of duplicates, the first in input order is kept. Output: OUTPUT/part-NNNNNN
.jsonl.zst ({"text", "id" when the input record has one}), report.json (counts, bytes and
examples per stage and reason) and manifest.json (the same counts, the full recipe, the
inputs and shard hashes), written last. Byte-identical for any --num-workers. An OUTPUT that
holds a finished dataset is refused unless --overwrite; the old one stays whole until the new
one is complete. Errors are one `error: ...` line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from data_tools.curate_lib.pipeline import Options, build  # noqa: E402
from data_tools.shard_lib.pipeline import TXT_MODES  # noqa: E402
from pretrain.errors import EXIT_INTERRUPTED, OneLineParser, UserError, report  # noqa: E402


def parse_args(argv=None) -> Options:
    summary, _, details = __doc__.partition("\n\n")
    parser = OneLineParser(description=" ".join(summary.split()), epilog=details,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                        help="files, directories (recursive) or globs; may be repeated")
    parser.add_argument("--output", required=True, metavar="DIR", help="curated dataset directory")
    parser.add_argument("--recipe", required=True, metavar="FILE", help="YAML list of stages")
    parser.add_argument("--text-key", default="text",
                        help="JSONL field / parquet column with the text (default: text)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                        help=".txt documents: whole file (default) or blank-line paragraphs")
    parser.add_argument("--num-workers", type=int, metavar="K",
                        help="parallel tasks, one CPU each (default: all CPUs)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="use this Ray cluster instead of starting a local one (inputs and "
                             "OUTPUT must be on storage every node sees at the same path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished curated dataset in OUTPUT (the old one stays "
                             "whole until the new one is complete)")
    parser.add_argument("--shard-bytes", type=int, default=256 << 20, metavar="B",
                        help="uncompressed JSON per output shard (default: 256 MiB)")
    # Read task size: the output bytes do not depend on it (tested); for tests and tuning.
    parser.add_argument("--unit-bytes", type=int, default=64 << 20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return Options(inputs=args.input, output=args.output, recipe=args.recipe,
                   text_key=args.text_key, txt_mode=args.txt_mode, num_workers=args.num_workers,
                   ray_address=args.ray_address, overwrite=args.overwrite,
                   shard_bytes=args.shard_bytes, unit_bytes=args.unit_bytes)


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        build(opts)
    except UserError as err:
        return report(err, label="error")
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command (add --overwrite if it had finished)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
