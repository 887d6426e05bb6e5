"""Write the built-in corpus (this Python's standard-library source) as JSONL, one document
per module, so `make demo` can run the real pipeline: tokenizer -> shard.py -> training.

    python data_tools/export_embedded_corpus.py --output runs/demo/corpus.jsonl [--max-bytes N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from pretrain.data.embedded import stdlib_files  # noqa: E402
from pretrain.files import write_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-bytes", type=int, default=4_000_000,
                        help="stop adding modules once this much source is collected")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(args.max_bytes)
    lines = [json.dumps({"text": path.read_bytes().decode("utf-8", errors="replace"),
                         "source": path.name}) + "\n" for path in files]
    write_atomic(output, "".join(lines))  # never a half-written corpus under the final name
    print(f"wrote {len(files)} documents to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
