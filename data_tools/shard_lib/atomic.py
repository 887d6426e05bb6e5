"""Writes that never leave a partial file under a final name (temp file in the same directory,
fsync, rename, fsync the directory), stale temp-file cleanup and the output-directory lock."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from data_tools.shard_lib.errors import ShardError

# `.NAME.tmp-PID`: hidden, so globs such as `train-*.tar` never match a file being written.
TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(temp: Path, final: Path, durable: bool = True) -> None:
    """Rename a fully written (and, if durable, fsynced) temp file to its final name."""
    os.replace(temp, final)
    if durable:
        fsync_dir(final.parent)


def write_atomic(final: Path, data: bytes, durable: bool = True) -> None:
    temp = temp_path(final)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        commit(temp, final, durable)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by a killed run (the caller holds the directory lock)."""
    removed = 0
    if directory.is_dir():
        for entry in os.scandir(directory):
            if TEMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    return removed


class DirLock:
    """An exclusive flock on DIR/.lock: two shard.py runs writing one directory would
    interleave shards. The lock dies with the process, so a killed run never leaves it held."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ShardError(f"{directory} is being written by another shard.py run; wait for it "
                             f"to finish or choose another --output") from None

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
