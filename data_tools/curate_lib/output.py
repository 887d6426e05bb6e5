"""The output of curate.py: `.jsonl.zst` shards of the kept documents, report.json, and
manifest.json written last (its presence is what marks the directory finished).

Shards are written to OUTPUT/.next/ under temp names; only when every one is complete is the
old manifest (if --overwrite replaces a dataset) removed, the new shards renamed into place,
stale shards deleted, the report and then the manifest written. A run that fails or is killed
before that leaves OUTPUT as it was. Hidden names (.next, .lock) are skipped by every reader
of directories (pretrain/data/formats.py), so shard.py can take OUTPUT as --input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from data_tools.curate_lib.errors import CurateError
from data_tools.shard_lib.atomic import DirLock, remove_stale_temps
from data_tools.shard_lib.errors import ShardError
from pretrain.files import commit, file_sha256, fsync_dir, temp_path, write_atomic

MANIFEST = "manifest.json"
REPORT = "report.json"
STAGING = ".next"
SHARD_RE = re.compile(r"^part-\d{6}\.jsonl\.zst$")
ZSTD_LEVEL = 3  # single-threaded, fixed level: the compressed bytes are deterministic


def shard_name(index: int) -> str:
    return f"part-{index:06d}.jsonl.zst"


def _ours(name: str) -> bool:
    return name.startswith(".") or name in (MANIFEST, REPORT) or bool(SHARD_RE.match(name))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that is a file, holds a finished dataset (without --overwrite), or holds
    files that are not curate.py's (they would become shard.py's input too)."""
    if output.exists() and not output.is_dir():
        raise CurateError(f"--output {output}: exists and is not a directory; choose a directory")
    if not output.is_dir():
        return
    others = sorted(e.name for e in os.scandir(output) if not _ours(e.name))
    if others:
        raise CurateError(f"--output {output}: holds files curate.py did not write ({others[0]}"
                          f"{', ...' if len(others) > 1 else ''}); choose an empty or new directory")
    manifest = output / MANIFEST
    if manifest.exists() and not overwrite:
        raise CurateError(f"--output {output}: holds a finished curated dataset; pass "
                          f"--overwrite to replace it (it stays whole until the new one is "
                          f"complete), or choose another --output")


def lock(output: Path) -> DirLock:
    try:
        output.mkdir(parents=True, exist_ok=True)
        held = DirLock(output)
    except ShardError:
        raise CurateError(f"--output {output}: another run is writing it; wait for it to finish "
                          f"or choose another --output") from None
    except OSError as err:
        raise CurateError(f"--output {output}: cannot create or lock it ({err.strerror or err}); "
                          f"choose a writable directory") from None
    remove_stale_temps(output)
    return held


class ShardWriter:
    """Kept documents as JSON lines ({"text": ..., "id": ...}) into zstd shards of about
    `shard_bytes` of uncompressed JSON each, in OUTPUT/.next/."""

    def __init__(self, output: Path, shard_bytes: int):
        import zstandard

        self.staging = output / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self.shard_bytes = shard_bytes
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0)
        self.shards: list[dict] = []
        self.file = self.stream = None

    def _open(self) -> None:
        name = shard_name(len(self.shards))
        self.file = open(temp_path(self.staging / name), "wb")
        self.stream = self.compressor.stream_writer(self.file, closefd=False)
        self.shards.append({"name": name, "documents": 0, "text_bytes": 0, "json_bytes": 0})

    def _close(self) -> None:
        self.stream.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = self.stream = None
        name = self.shards[-1]["name"]
        commit(temp_path(self.staging / name), self.staging / name, durable=False)

    def add(self, text: str, id_json: str, text_bytes: int) -> None:
        if self.stream is None:
            self._open()
        # id_json is the input record's id as JSON text ('' when it has none).
        line = ('{"text": ' + json.dumps(text, ensure_ascii=False)
                + (', "id": ' + id_json if id_json else "") + "}\n").encode("utf-8")
        self.stream.write(line)
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["text_bytes"] += text_bytes
        shard["json_bytes"] += len(line)
        if shard["json_bytes"] >= self.shard_bytes:
            self._close()

    def finish(self) -> list[dict]:
        if self.stream is not None:
            self._close()
        for shard in self.shards:
            path = self.staging / shard["name"]
            shard["bytes"] = path.stat().st_size
            shard["sha256"] = file_sha256(path)
        fsync_dir(self.staging)
        return self.shards

    def abort(self) -> None:
        """Drop everything staged (a finished dataset in OUTPUT is untouched)."""
        if self.file is not None:
            self.file.close()
            self.file = self.stream = None
        shutil.rmtree(self.staging, ignore_errors=True)


def publish(output: Path, shards: list[dict], report: dict, manifest: dict) -> None:
    """Swap the staged shards in: old manifest out, shards in, stale shards out, report, then
    the manifest last."""
    staging = output / STAGING
    (output / MANIFEST).unlink(missing_ok=True)
    fsync_dir(output)
    names = {shard["name"] for shard in shards}
    for name in sorted(names):
        os.replace(staging / name, output / name)
    for entry in os.scandir(output):
        if SHARD_RE.match(entry.name) and entry.name not in names:
            os.unlink(entry.path)
    fsync_dir(output)
    write_atomic(output / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(output / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
