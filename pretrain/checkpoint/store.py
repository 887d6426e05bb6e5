"""The checkpoint directory on disk: names, the completeness record, publish by rename,
the `latest` pointer, retention and recovery after a crash. No torch.distributed here:
the manager decides which rank calls what and when.

    RUN/checkpoints/
        step_00000100/          a complete checkpoint (published by one rename)
            checkpoint.json     written last inside the staging directory: format, step,
                                and every other file's size and sha256
            train_state.json    counters, loader and scheduler state, config, tokenizer
            ...                 megatron dist_checkpointing files (torch_dist format)
        step_00000200.tmp-<id>/ a save in progress, or the remains of a killed one
        latest                  "step_00000200\\n", replaced atomically after the rename

A directory is a checkpoint only when its name is step_N and checkpoint.json lists every
file with the right size (and, when verified, the right sha256). Readers never trust
`latest` alone: it is a pointer for people and tools, written last, and a reader falls back
to the newest complete step_N directory when it is missing or stale.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import CheckpointError
# The project's one atomic-write and file-hash helpers (pretrain/files.py), under the names
# the checkpoint code and its tests use.
from pretrain.files import file_sha256 as sha256_file  # noqa: F401
from pretrain.files import fsync_dir, fsync_tree  # noqa: F401
from pretrain.files import write_atomic as write_text_atomic

# The run directory's names (checkpoints/, latest, train_state.json, step_N) belong to
# pretrain/run_dir.py.
from pretrain.run_dir import CHECKPOINTS, LATEST, STEP_RE, step_name

FORMAT = "pretrain-checkpoint"
FORMAT_VERSION = 1
RECORD = "checkpoint.json"
STAGING_SUFFIX = re.compile(r"^\.tmp-[0-9a-f]+$")  # after a step name: a save in progress
TRASH_RE = re.compile(r"^\.trash-.+$")


def is_staging(name: str) -> bool:
    """Whether `name` is a staging directory's: a step name, then `.tmp-<hex>`."""
    step, dot, rest = name.partition(".")
    return bool(dot and STEP_RE.match(step) and STAGING_SUFFIX.match(dot + rest))


def list_files(root: Path) -> list[str]:
    """Every regular file below root, as sorted relative POSIX paths, the record excluded."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != RECORD:
                out.append(rel)
    return sorted(out)


def write_record(staging: Path, step: int, hashes: dict[str, str], extra: dict) -> None:
    """checkpoint.json: the list of files that make this checkpoint, with sizes and
    digests. Written last; a staging directory without it is incomplete by definition."""
    files = {}
    for rel in list_files(staging):
        if rel not in hashes:
            raise CheckpointError(f"{staging / rel}: written but not hashed by any rank")
        files[rel] = {"bytes": (staging / rel).stat().st_size, "sha256": hashes[rel]}
    missing = sorted(set(hashes) - set(files))
    if missing:
        raise CheckpointError(f"{staging}: hashed files are missing: {', '.join(missing[:5])}")
    record = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, **extra,
              "files": files}
    write_text_atomic(staging / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_record(path: Path) -> dict:
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {RECORD}, so the save never finished") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / RECORD}: unreadable ({err})") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path / RECORD}: not a {FORMAT} record")
    if record.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / RECORD}: format version {record.get('version')}, this "
                              f"code reads version {FORMAT_VERSION}")
    return record


def check_sizes(path: Path, record: dict) -> None:
    """Every listed file present with its recorded size; nothing unlisted."""
    present = set(list_files(path))
    listed = record["files"]
    for rel, meta in sorted(listed.items()):
        if rel not in present:
            raise CheckpointError(f"{path / rel}: listed in {RECORD} but missing")
        size = (path / rel).stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{path / rel}: {size} bytes, {RECORD} says {meta['bytes']} "
                                  f"(truncated or overwritten)")
    extra = sorted(present - set(listed))
    if extra:
        raise CheckpointError(f"{path}: files not listed in {RECORD}: {', '.join(extra[:5])}")


def check_digests(path: Path, record: dict, names: list[str]) -> None:
    for rel in names:
        if sha256_file(path / rel) != record["files"][rel]["sha256"]:
            raise CheckpointError(f"{path / rel}: sha256 differs from {RECORD} (corrupt)")


# torch.distributed.checkpoint reads its `.metadata` index with plain pickle.load, and an
# index entry of type BytesStorageMetadata makes the load planner torch.load(...,
# weights_only=False) that entry's bytes. Before DCP sees a checkpoint, the index is
# unpickled once here with an exact-class allowlist (the classes a tensor-only index holds),
# and refused if any entry is not a tensor: this code never saves anything but tensors.
_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_PLANNER = "torch.distributed.checkpoint.planner"
_INDEX_CLASSES = frozenset({
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "TensorProperties"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "StorageMeta"), (_DCP_META, "MetadataIndex"),
    (_DCP_META, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # megatron keeps the save plans in the index (to reuse them on the next save)
    (_DCP_PLANNER, "SavePlan"), (_DCP_PLANNER, "WriteItem"), (_DCP_PLANNER, "WriteItemType"),
    (_DCP_PLANNER, "TensorWriteData"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
})


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import torch

        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _INDEX_CLASSES and not is_dtype:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a tensor index never holds")
        return super().find_class(module, name)


def check_index_pickle(path: Path) -> None:
    """Refuse a `.metadata` that would run code or unpickle anything when DCP loads it."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    index = path / ".metadata"
    if not index.exists():
        return
    try:
        with open(index, "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except Exception as err:  # noqa: BLE001 - any failure to parse is a refusal
        raise CheckpointError(f"{index}: not a plain tensor index ({type(err).__name__}: {err}); "
                              f"refusing to load it") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{index}: not a torch.distributed.checkpoint index "
                              f"({type(metadata).__name__}); refusing to load it")
    for key, entry in metadata.state_dict_metadata.items():
        if type(entry) is not TensorStorageMetadata:
            raise CheckpointError(f"{index}: entry {key!r} is a {type(entry).__name__}, not a "
                                  f"tensor; loading it would unpickle its bytes, so this "
                                  f"checkpoint is refused")


@dataclass(frozen=True)
class Candidate:
    step: int
    path: Path


class CheckpointDir:
    """RUN/checkpoints (or any directory laid out the same way)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ naming
    def final(self, step: int) -> Path:
        return self.root / step_name(step)

    def staging(self, step: int, nonce: str) -> Path:
        return self.root / f"{step_name(step)}.tmp-{nonce}"

    def candidates(self) -> list[Candidate]:
        """Published step_N directories, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in os.scandir(self.root):
            match = STEP_RE.match(entry.name)
            if match and entry.is_dir():
                out.append(Candidate(int(match.group(1)), Path(entry.path)))
        return sorted(out, key=lambda c: c.step, reverse=True)

    def latest_pointer(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    # ------------------------------------------------------------------ writing (rank 0)
    def publish(self, staging: Path, step: int, after_rename=None) -> Path:
        """Rename a complete staging directory to step_N, then point `latest` at it."""
        fsync_tree(staging)
        final = self.final(step)
        if final.exists():  # a checkpoint of this step from before a crash: replace it
            self._trash(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        if after_rename is not None:
            after_rename()
        write_text_atomic(self.root / LATEST, final.name + "\n")
        return final

    def _trash(self, path: Path) -> None:
        # Renamed away first, so a crash in the middle of the delete leaves no step_N
        # directory with some files gone.
        trash = self.root / f".trash-{path.name}-{os.getpid()}"
        os.rename(path, trash)
        fsync_dir(self.root)
        _delete(trash)

    def apply_retention(self, keep_last: int, keep_every: int, protect: set[int] = frozenset(),
                        verified=None) -> list[int]:
        """Delete published checkpoints beyond the newest keep_last *verified* ones, except
        multiples of keep_every and the steps in `protect` (the one just saved, the one
        resumed from). `verified(candidate)` says whether a checkpoint is intact (default:
        all are); one that is not is neither counted nor deleted here, so a corrupt newest
        checkpoint can never push the good ones out. Returns the steps deleted."""
        deleted, counted = [], 0
        for cand in self.candidates():
            if counted < keep_last:
                if cand.step in protect or verified is None or verified(cand):
                    counted += 1
                continue
            if cand.step in protect or (keep_every and cand.step % keep_every == 0):
                continue
            self._trash(cand.path)
            deleted.append(cand.step)
        return deleted

    def remove_leftovers(self) -> list[str]:
        """Staging directories of saves that never finished, and interrupted deletes."""
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in os.scandir(self.root):
            if is_staging(entry.name) or TRASH_RE.match(entry.name):
                _delete(Path(entry.path))
                removed.append(entry.name)
        return removed


def _delete(path: Path) -> None:
    """Remove a checkpoint (or its trash). A step_N that is a symlink (to a shared pretrained
    checkpoint, a copied run) loses the link only: a delete never follows one, and rmtree
    refusing links must not leave the link behind under a .trash name either."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def resolve_load_path(path: str | Path) -> tuple[CheckpointDir, Path | None]:
    """`checkpoint.load_from` may name a step_N directory, a checkpoints directory or a run
    directory. Returns the checkpoints directory and the one step directory asked for
    (None: the newest complete one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint.load_from={path}: no such file or directory")
    if STEP_RE.match(p.name) and p.is_dir():
        return CheckpointDir(p.parent), p
    if (p / CHECKPOINTS).is_dir():
        return CheckpointDir(p / CHECKPOINTS), None
    if any(STEP_RE.match(e.name) for e in os.scandir(p)) or (p / LATEST).exists():
        return CheckpointDir(p), None
    raise CheckpointError(f"checkpoint.load_from={path}: neither a step_N checkpoint, a "
                          f"{CHECKPOINTS} directory nor a run directory with {CHECKPOINTS}/")
