"""Packing and writing: a split's token stream is cut into samples of seq_len + 1 tokens, each
written as `K.doc_starts` + `K.tokens` into USTAR tars with fixed metadata (docs/formats.md).

Tar headers come from a per-(extension, size) template made by tarfile and patched with the
key and checksum: byte-identical to tarfile's output (the tests compare) at a tenth of its cost.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tarfile
from pathlib import Path

import numpy as np

from pretrain.data.formats import shard_name
from pretrain.files import commit, temp_path

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to whole records
KEY_DIGITS = 10
SHARD_TARGET_BYTES = 64 << 20
# Test hook: SIGKILL this process right after it starts the shard that follows the N-th
# finished one, leaving a partial temp file behind (tests/data_tools/test_shard.py).
KILL_AFTER_ENV = "SHARD_TEST_KILL_AFTER_SHARDS"

_templates: dict[tuple[str, int], tuple[bytes, int]] = {}


def member_header(key: int, ext: str, size: int) -> bytes:
    """The USTAR header tarfile writes for member `KEY.ext` with the fixed metadata."""
    template = _templates.get((ext, size))
    if template is None:
        info = tarfile.TarInfo(f"{0:0{KEY_DIGITS}d}.{ext}")
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        template = (buf, int(buf[148:154], 8) - ord("0") * KEY_DIGITS)
        _templates[(ext, size)] = template
    buf, base_checksum = template
    digits = b"%010d" % key
    if len(digits) != KEY_DIGITS:
        raise ValueError(f"sample key {key} does not fit {KEY_DIGITS} digits")
    checksum = base_checksum + sum(digits)
    return digits + buf[KEY_DIGITS:148] + b"%06o\0" % checksum + buf[155:]


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def sample_bytes(key: int, tokens: bytes, doc_starts: bytes) -> bytes:
    return b"".join((member_header(key, "doc_starts", len(doc_starts)), doc_starts,
                     _padding(len(doc_starts)), member_header(key, "tokens", len(tokens)),
                     tokens, _padding(len(tokens))))


def default_shard_samples(seq_len: int, itemsize: int) -> int:
    """Samples per shard for shards of about 64 MB (headers and padding included)."""
    per_sample = 3 * BLOCK + -(-(seq_len + 1) * itemsize // BLOCK) * BLOCK
    return max(1, SHARD_TARGET_BYTES // per_sample)


class _ShardFile:
    """One tar being written under a temp name; hashed as written, renamed when complete."""

    def __init__(self, final: Path, first_key: int):
        self.final, self.temp, self.first_key = final, temp_path(final), first_key
        self.file = open(self.temp, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.bytes = self.samples = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def finish(self, tokens_per_sample: int) -> dict:
        end = b"\0" * (2 * BLOCK)  # end-of-archive marker, then padding to a whole record
        self.write(end + b"\0" * (-(self.bytes + len(end)) % RECORD))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        commit(self.temp, self.final)
        return {"name": self.final.name, "first_key": self.first_key, "samples": self.samples,
                "tokens": self.samples * tokens_per_sample, "bytes": self.bytes,
                "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


class ShardCounter:
    """Shards finished over all splits (drives the kill test hook)."""

    def __init__(self):
        self.finished = 0
        limit = os.environ.get(KILL_AFTER_ENV)
        self.kill_after = int(limit) if limit else None


class SplitWriter:
    """Packs one split's documents, in the order given, into samples and shards."""

    def __init__(self, output: Path, split: str, seq_len: int, dtype: np.dtype, eod_id: int,
                 shard_samples: int, counter: ShardCounter):
        self.output, self.split, self.seq_len = output, split, seq_len
        self.width = seq_len + 1
        self.dtype, self.eod_id, self.shard_samples = dtype, eod_id, shard_samples
        self.counter = counter
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.next_key = 0
        self.shards: list[dict] = []
        self.current: _ShardFile | None = None

    def add(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens < self.width:
            return
        stream = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        count = len(stream) // self.width
        self._write_samples(stream[:count * self.width].reshape(count, self.width))
        rest = stream[count * self.width:]
        self.pending = [rest.copy()] if len(rest) else []  # copy: do not pin the whole piece
        self.pending_tokens = len(rest)

    def _write_samples(self, samples: np.ndarray) -> None:
        # A document starts after each EOD, counted at positions 1..seq_len (an EOD in the last
        # slot starts a document in the next sample, at its position 0, which is implicit).
        rows, cols = np.nonzero(samples[:, :self.seq_len] == self.eod_id)
        starts = (cols + 1).astype("<u4")
        bounds = np.searchsorted(rows, np.arange(len(samples) + 1))
        for i in range(len(samples)):
            if self.current is None:
                self._open()
            doc_starts = starts[bounds[i]:bounds[i + 1]].tobytes()
            self.current.write(sample_bytes(self.next_key, samples[i].tobytes(), doc_starts))
            self.current.samples += 1
            self.next_key += 1
            if self.counter.kill_after is not None and self.counter.finished >= self.counter.kill_after:
                self.current.file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.current.samples == self.shard_samples:
                self._finish_shard()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self.current = _ShardFile(self.output / name, self.next_key)

    def _finish_shard(self) -> None:
        self.shards.append(self.current.finish(self.width))
        self.current = None
        self.counter.finished += 1

    def finish(self) -> int:
        """Close the last shard; returns the tail tokens that did not fill a sample."""
        if self.current is not None:
            self._finish_shard()
        tail = self.pending_tokens
        self.pending, self.pending_tokens = [], 0
        return tail

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None

    def summary(self) -> dict:
        samples = sum(s["samples"] for s in self.shards)
        return {"samples": samples, "tokens": samples * self.width, "shards": self.shards}
