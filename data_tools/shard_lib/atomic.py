"""The output directory of shard.py: its lock, and the cleanup of temp files a killed run left
(the writes themselves go through pretrain/files.py)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from data_tools.shard_lib.errors import ShardError
from pretrain.files import TEMP_RE


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
