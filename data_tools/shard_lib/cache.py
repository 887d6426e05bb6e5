"""Tokenized pieces on the driver, and their cache in DIR/.work: a killed run re-tokenizes only
the read units it had not finished, and the resumed output is byte-identical.

A unit's pieces are `KEY-000000.npz`, ..., with the last one named `KEY-NNNNNN-last.npz`, so a
listing tells which units are complete. KEY hashes everything tokenization depends on: the
unit's files (path, size, mtime) and byte ranges, the tokenizer's sha256 and the read and
chunking settings; a change to any of them makes a new key and the old entries are ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.shard_lib.atomic import remove_stale_temps
from data_tools.shard_lib.errors import ShardError
from pretrain.files import write_atomic

CACHE_VERSION = 3  # 3: pieces carry each entry's UTF-8 byte count (nbytes)
_PIECE_RE = re.compile(r"^([0-9a-f]{32})-(\d{6})(-last)?\.npz$")


@dataclass
class TokenizedPiece:
    unit: int
    piece: int
    last: bool
    tokens: np.ndarray  # token_dtype, EOD after each document
    ntok: np.ndarray  # int64 tokens per entry, EOD included
    nbytes: np.ndarray  # int64 UTF-8 bytes of text per entry (for bits-per-byte)
    digests: bytes  # 16 bytes per entry: its document's normalized-text blake2b
    repaired: np.ndarray  # uint8 per entry: 1 when its document's UTF-8 was repaired
    flags: np.ndarray  # uint8 per entry: inputs.FIRST / LAST (an entry may be part of a document)
    read: int  # records read, rejected ones included
    rejected: dict  # reason -> count, for records dropped while reading
    bad: dict | None  # the first bad record (missing text key, invalid JSON): where and why
    fatal: str  # a reason the whole run must stop (unreadable file)
    progress: int  # input bytes this piece accounts for (progress display only)

    @classmethod
    def from_arrow(cls, table, i: int, dtype: np.dtype) -> "TokenizedPiece":
        column = {name: table.column(name)[i] for name in table.column_names}
        bad = column["bad"].as_py()
        return cls(unit=column["unit"].as_py(), piece=column["piece"].as_py(),
                   last=column["last"].as_py(),
                   tokens=np.frombuffer(column["tokens"].as_buffer(), dtype=dtype),
                   ntok=np.frombuffer(column["ntok"].as_py(), dtype=np.int64),
                   nbytes=np.frombuffer(column["nbytes"].as_py(), dtype=np.int64),
                   digests=column["digests"].as_py(),
                   repaired=np.frombuffer(column["repaired"].as_py(), dtype=np.uint8),
                   flags=np.frombuffer(column["flags"].as_py(), dtype=np.uint8),
                   read=column["read"].as_py(), rejected=json.loads(column["rejected"].as_py()),
                   bad=json.loads(bad) if bad else None, fatal=column["fatal"].as_py(),
                   progress=column["progress"].as_py())

    def meta(self) -> dict:
        return {"unit": self.unit, "piece": self.piece, "last": self.last, "read": self.read,
                "rejected": self.rejected, "bad": self.bad, "progress": self.progress}


class WorkCache:
    def __init__(self, output: Path, salt: dict):
        self.root = output / ".work"
        self.salt = salt
        self.root.mkdir(exist_ok=True)
        remove_stale_temps(self.root)
        self._listing = set(os.listdir(self.root))

    def unit_key(self, unit: dict) -> str:
        identity = {"version": CACHE_VERSION, "salt": self.salt, "segments": unit["segments"]}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def _name(self, key: str, piece: int, last: bool) -> str:
        return f"{key}-{piece:06d}{'-last' if last else ''}.npz"

    def complete(self, key: str) -> int:
        """Number of pieces of a fully cached unit, or 0."""
        index = 0
        while True:
            if self._name(key, index, True) in self._listing:
                return index + 1
            if self._name(key, index, False) not in self._listing:
                return 0
            index += 1

    def load(self, key: str, index: int, count: int, dtype: np.dtype) -> TokenizedPiece:
        path = self.root / self._name(key, index, index == count - 1)
        try:
            with np.load(path) as npz:
                meta = json.loads(npz["meta"].tobytes())
                piece = TokenizedPiece(tokens=npz["tokens"], ntok=npz["ntok"], nbytes=npz["nbytes"],
                                       digests=npz["digests"].tobytes(), repaired=npz["repaired"],
                                       flags=npz["flags"], fatal="", **meta)
            if (piece.tokens.dtype != dtype or piece.ntok.sum() != len(piece.tokens)
                    or len(piece.digests) != 16 * len(piece.ntok)
                    or not len(piece.ntok) == len(piece.nbytes) == len(piece.flags) == len(piece.repaired)):
                raise ValueError("inconsistent arrays")
        except (OSError, ValueError, KeyError) as err:
            for name in list(self._listing):
                if name.startswith(key):
                    (self.root / name).unlink(missing_ok=True)
            raise ShardError(f"{path}: unreadable work-cache entry ({err}); it was deleted, "
                             f"re-run the same command to recompute it") from None
        return piece

    def save(self, key: str, piece: TokenizedPiece) -> None:
        # No fsync: a cache entry lost to a crash is recomputed, and load() rejects torn ones.
        final = self.root / self._name(key, piece.piece, piece.last)
        buffer = io.BytesIO()
        np.savez(buffer, tokens=piece.tokens, ntok=piece.ntok, nbytes=piece.nbytes,
                 digests=np.frombuffer(piece.digests, np.uint8), repaired=piece.repaired,
                 flags=piece.flags,
                 meta=np.frombuffer(json.dumps(piece.meta()).encode(), np.uint8))
        write_atomic(final, buffer.getvalue(), durable=False)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
