"""Write the built-in corpus (this Python's standard-library source) as JSONL, one document
per module, so `make demo` can run the real pipeline: tokenizer -> shard.py -> training.

    python data_tools/export_embedded_corpus.py --output runs/demo/corpus.jsonl [--max-bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from pretrain.data.embedded import stdlib_files  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-bytes", type=int, default=4_000_000,
                        help="stop adding modules once this much source is collected")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    files = stdlib_files(args.max_bytes)
    with open(temp, "w", encoding="utf-8") as out:
        for path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            out.write(json.dumps({"text": text, "source": path.name}) + "\n")
    os.replace(temp, output)  # never a half-written corpus under the final name
    print(f"wrote {len(files)} documents to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
