"""`python -m pretrain.export_hf RUN_OR_CHECKPOINT --output DIR`: a Hugging Face Llama
directory that transformers loads with no code of ours.

DIR gets config.json, generation_config.json, safetensors weights (sharded above
--max-shard-size, with model.safetensors.index.json) and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, tokenizer.model). Everything is written to
a hidden sibling directory and renamed to DIR only when complete, so an interrupted export
never leaves a directory that looks finished. Exit status 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from pretrain.errors import UserError, report
from pretrain.hf.export import DTYPES, export
from pretrain.log import quiet_library_warnings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ directory or one "
                        "step_N checkpoint (a directory: its newest complete checkpoint)")
    parser.add_argument("--output", required=True, help="new (or empty) output directory")
    parser.add_argument("--tokenizer", default=None, help="the sentencepiece PREFIX.model the "
                        "training data was made with (default: the one the manifest names)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weight dtype in the safetensors files")
    parser.add_argument("--max-shard-size", type=int, default=5 * 2**30,
                        help="bytes per safetensors file before starting another")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of the checkpoint's files")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    gc.freeze()  # the imports' objects are never garbage (why: pretrain/train.py's main)
    quiet_library_warnings()
    args = parse_args(argv)
    output = Path(args.output)
    try:
        weights = export(args.checkpoint, output, args.tokenizer, args.dtype, args.max_shard_size,
                         verify=not args.no_verify)
    except UserError as err:
        return report(err, label="export error")
    tokenizer_note = "" if (output / "tokenizer.json").exists() else \
        " (no tokenizer: the run used the built-in byte-level corpus)"
    print(f"exported step {weights.train_state['step']} of {weights.path} to {output}"
          f"{tokenizer_note}\nload it with:\n  python -c \"from transformers import "
          f"AutoModelForCausalLM, AutoTokenizer; "
          f"m = AutoModelForCausalLM.from_pretrained('{output}')"
          + ("" if tokenizer_note else f"; t = AutoTokenizer.from_pretrained('{output}')") + "\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
