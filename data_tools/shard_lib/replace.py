"""Re-running shard.py into an --output that already holds a finished dataset: refuse when it
is another dataset (unless --overwrite), and replace it without ever losing the old one early.

The old manifest and shards stay untouched while the new shards are written to OUTPUT/.next/.
Only when every new shard is complete: the old manifest is removed (the directory is then
"not finished", never an old manifest with new shards), the new shards are renamed into
place, the new manifest is written, and shards no manifest lists any more are deleted. A run
that fails before that (a bad record, a full disk, a kill) leaves the old dataset as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain.data import formats
from pretrain.files import fsync_dir, write_atomic
from data_tools.shard_lib.errors import ShardError

STAGING = ".next"
# What makes two datasets the same one: the manifest fields a re-run must reproduce.
IDENTITY_FIELDS = ("seq_len", "token_dtype", "eod_id", "tokenizer.sha256", "settings", "inputs")


def _field(manifest: dict, dotted: str):
    value = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def existing_dataset(output: Path) -> dict | None:
    """The finished dataset's manifest in OUTPUT (None: none there), or a refusal when the
    file is not one shard.py wrote."""
    path = output / formats.MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != formats.FORMAT:
        return {}
    return manifest


def check_replace(output: Path, old: dict | None, new_identity: dict, overwrite: bool) -> bool:
    """Whether this run replaces a finished dataset (and so stages its shards). Raises when
    OUTPUT holds another dataset and --overwrite was not given."""
    if old is None:
        return False
    if overwrite:
        return True
    if not old:
        raise ShardError(f"--output {output}: {formats.MANIFEST} there is not a shard.py "
                         f"manifest; pass --overwrite to replace it, or choose another --output")
    for name in IDENTITY_FIELDS:
        was, now = _field(old, name), _field(new_identity, name)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
            what = "; ".join(f"{name}.{k}={was.get(k)!r} there, {now.get(k)!r} now" for k in keys[:2])
        elif isinstance(was, list) and isinstance(now, list):
            what = f"other {name} ({len(was)} files there, {len(now)} now, or other paths or sizes)"
        else:
            what = f"{name}={was!r} there, {now!r} now"
        raise ShardError(f"--output {output} holds another dataset ({what}); pass --overwrite to "
                         f"replace it, or choose another --output")
    return True  # the same dataset again: rebuilt (byte-identical) and swapped in


def staging_dir(output: Path) -> Path:
    """A fresh OUTPUT/.next (shards of a killed replacing run are rewritten anyway)."""
    staging = output / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def remove_staging(output: Path) -> None:
    shutil.rmtree(output / STAGING, ignore_errors=True)


def publish(output: Path, shard_dir: Path, manifest_bytes: bytes, names: set[str]) -> None:
    """Make the new dataset the one in OUTPUT: shards (from shard_dir when staged), the
    manifest last, then stale shards of the old dataset deleted."""
    if shard_dir != output:
        (output / formats.MANIFEST).unlink(missing_ok=True)
        fsync_dir(output)
        for name in sorted(names):
            os.replace(shard_dir / name, output / name)
        fsync_dir(output)
    write_atomic(output / formats.MANIFEST, manifest_bytes)
    for entry in os.scandir(output):
        if formats.SHARD_NAME_RE.match(entry.name) and entry.name not in names:
            os.unlink(entry.path)
    remove_staging(output)
