"""Tokenize text corpora on Ray into webdataset tar shards of fixed-length samples with a
manifest (docs/formats.md): the training data of pretrain/.

    python data_tools/shard.py --input corpus/ 'more/*.jsonl.zst' --output data/shards \\
        --tokenizer tokenizers/tok32k.model --seq-len 2048 [--val-fraction 0.01] [--num-workers 8]

Inputs: .txt (one document per file, or per blank-line-separated paragraph with --txt-mode
paragraph, stripped), .jsonl, .jsonl.gz, .jsonl.zst (field --text-key) and .parquet (column
--text-key); directories are searched recursively (other file types and hidden entries are
skipped), globs are expanded. Documents are taken in sorted-path, then in-file order.

Cleaning, counted per reason in the manifest: 'empty' (whitespace only), 'binary' (over 30% of
the characters U+FFFD or NUL after repair), 'duplicate' (same normalized text -- ASCII
whitespace runs collapsed -- as an earlier document; the first is kept; --no-dedup keeps all),
'missing_text_key' / 'invalid_json' (only with --skip-bad-records; otherwise the first such
record stops the run, naming file and line). Invalid UTF-8 is replaced by U+FFFD and counted
(utf8_repaired). Kept documents are tokenized on a Ray actor pool (one single-threaded
tokenizer per CPU), each followed by EOD (eos; a tokenizer.json's BOS before it where its
post-processor adds one), split into train/val by a hash of the normalized text, and packed
into samples of seq_len + 1 tokens.

Output is byte-identical for any --num-workers. Shards and manifest.json are written under
temp names and renamed when complete, manifest last (OUTPUT/.lock keeps a second run out).
An OUTPUT that holds a finished dataset of other settings or inputs is refused unless
--overwrite; the old dataset stays whole (manifest and shards) until the new one is complete.
Tokenized pieces are cached in OUTPUT/.work, so re-running the same command after a kill
resumes and gives the same bytes; the cache is deleted after success (--keep-work keeps it).
Documents longer than --chunk-bytes are encoded in chunks cut where a run of spaces starts
(exact for this project's tokenizers; an approximation only where a stretch of half a chunk
has no space and is cut at a character boundary); those longer than a piece (4 MB) are
tokenized in parts by several actors. Errors are one `error: ...` line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from data_tools.shard_lib.pipeline import TXT_MODES, Options, build  # noqa: E402
from pretrain.errors import EXIT_INTERRUPTED, OneLineParser, UserError, report  # noqa: E402


def parse_args(argv=None) -> Options:
    summary, _, details = __doc__.partition("\n\n")
    parser = OneLineParser(description=" ".join(summary.split()), epilog=details,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                        help="files, directories (recursive) or globs; may be repeated")
    parser.add_argument("--output", required=True, metavar="DIR", help="shard directory")
    parser.add_argument("--tokenizer", required=True, metavar="PREFIX.model",
                        help="sentencepiece model (its eos id is the EOD token), or a Hugging "
                             "Face tokenizer.json (EOD: tokenizer_config.json's eos_token; BOS "
                             "where its post-processor adds one)")
    parser.add_argument("--seq-len", type=int, required=True, metavar="N",
                        help="samples hold N + 1 tokens")
    parser.add_argument("--text-key", default="text",
                        help="JSONL field / parquet column with the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                        help="share of documents in the val split (default: 0.01)")
    parser.add_argument("--num-workers", type=int, metavar="K",
                        help="tokenizer actors, one CPU each (default: all CPUs)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="use this Ray cluster instead of starting a local one (inputs and "
                             "OUTPUT must be on storage every node sees at the same path)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                        help=".txt documents: whole file (default) or blank-line paragraphs")
    parser.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                        help="drop exact duplicates of the normalized text (default: on)")
    parser.add_argument("--shard-samples", type=int, metavar="S",
                        help="samples per shard (default: about 64 MB per shard)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip and count JSONL/parquet records without the text field or "
                             "with invalid JSON, instead of stopping with an error")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, metavar="B",
                        help="encode documents longer than this in chunks (default: 1 MiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished dataset of other settings or inputs in OUTPUT "
                             "(the old one stays whole until the new one is complete)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the tokenization cache OUTPUT/.work after success")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar / progress lines")
    # Work granularity (read task and tokenize/cache piece sizes); the output bytes do not
    # depend on them (tested), so they are for tests and tuning only.
    parser.add_argument("--unit-bytes", type=int, default=64 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--piece-bytes", type=int, default=4 << 20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return Options(inputs=args.input, output=args.output, tokenizer=args.tokenizer,
                   seq_len=args.seq_len, text_key=args.text_key, val_fraction=args.val_fraction,
                   num_workers=args.num_workers, ray_address=args.ray_address,
                   txt_mode=args.txt_mode, dedup=args.dedup, shard_samples=args.shard_samples,
                   skip_bad_records=args.skip_bad_records, chunk_bytes=args.chunk_bytes,
                   keep_work=args.keep_work, progress=args.progress, overwrite=args.overwrite,
                   unit_bytes=args.unit_bytes, piece_bytes=args.piece_bytes)


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        build(opts)
    except UserError as err:  # ShardError, and the data layer's input and tokenizer errors
        return report(err, label="error")
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
