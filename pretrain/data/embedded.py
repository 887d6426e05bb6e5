"""The built-in corpus: this Python's own standard-library source, byte-tokenized.

Every Python install carries it, so `make demo` and the tests need no network and no
download. The file list is fixed and sorted, and its sha256 is recorded, so two machines
with the same Python build see the same bytes.
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

# Byte-level vocabulary: ids 0-255 are bytes, 256 ends a document.
EOD_ID = 256
BYTE_VOCAB_SIZE = 257


class ByteTokenizer:
    """Lossless UTF-8 byte tokenizer; decoding repairs split multi-byte characters."""

    vocab_size = BYTE_VOCAB_SIZE
    eod_id = EOD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def stdlib_files(max_bytes: int) -> list[Path]:
    """Top-level stdlib modules in sorted order, until `max_bytes` of source is collected."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}; "
                           f"the embedded corpus needs a Python install with its .py files")
    return files


@lru_cache(maxsize=4)
def embedded_tokens(max_bytes: int = 4_000_000) -> tuple[np.ndarray, str]:
    """All documents byte-tokenized and joined with EOD: (uint16 tokens, sha256 of the text)."""
    digest = hashlib.sha256()
    parts = []
    for path in stdlib_files(max_bytes):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + data)
        parts.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOD_ID], dtype=np.uint16))
    return np.concatenate(parts), digest.hexdigest()
