"""The file helpers every writer in the project shares: the atomic write (temp name in the same
directory, fsync, rename, fsync the directory) and the file hash.

No reader ever sees a partial file under its final name: shards, manifests, tokenizer models
and cards, checkpoint records, exported models and metric files all go through `write_atomic`
(or, for a file written in pieces, `temp_path` + `commit`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# `.NAME.tmp-PID`: hidden, so globs such as `train-*.tar` never match a file being written.
TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def temp_path(final: Path) -> Path:
    """Where `final` is written before `commit` renames it into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory below root to stable storage (a rename is only as
    durable as the data it publishes)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def commit(temp: Path, final: Path, durable: bool = True) -> None:
    """Rename a fully written (and, if durable, fsynced) temp file to its final name."""
    os.replace(temp, final)
    if durable:
        fsync_dir(Path(final).parent)


def write_atomic(final: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Write `data` (str as UTF-8) so that `final` holds the old bytes or all the new ones.
    durable=False skips the fsyncs, for files that are cheap to recompute."""
    final = Path(final)
    temp = temp_path(final)
    try:
        with open(temp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        commit(temp, final, durable)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks so large files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def unwritable(path: str | Path) -> str | None:
    """Why a file cannot be written at PATH (None: it can, as far as can be told before
    writing): checked before hours of work whose result would go there."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        return f"{path} is a {'symlink' if path.is_symlink() else 'directory'}; name a file"
    parent = path.parent
    if not parent.is_dir():
        return f"{parent} is not a directory; create it first"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
