"""A minimal writer of the shard format (docs/formats.md) for loader tests, independent of
data_tools/shard.py so the loader is tested against the spec, not against one writer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np


def sample_tokens(key: int, seq_len: int, salt: int = 0) -> np.ndarray:
    """Recognizable contents: the first token encodes the key (and the dataset's salt)."""
    return ((key + 1000 * salt) * 7 + np.arange(seq_len + 1)) % 60000


def write_dataset(root: Path, seq_len: int, shard_sizes: list[int], split: str = "train",
                  tokenizer_sha: str = "tok-a", salt: int = 0, doc_starts=None,
                  extra_splits: dict | None = None, text_bytes: dict | None = None,
                  samples: np.ndarray | None = None, vocab_size: int = 60000,
                  eod_id: int = 3) -> Path:
    """`text_bytes`: {split: bytes} to record per split (bits-per-byte); None: the field is
    absent, as in manifests written before shard.py recorded it. `samples`: the [n, seq_len+1]
    tokens of the split's samples in key order (default: `sample_tokens`)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, sizes in {split: shard_sizes, **(extra_splits or {})}.items():
        shards, key = [], 0
        for index, count in enumerate(sizes):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for k in range(key, key + count):
                    members = {
                        "tokens": (sample_tokens(k, seq_len, salt) if samples is None
                                   else samples[k]).astype("<u2").tobytes(),
                        "doc_starts": np.array((doc_starts or {}).get(k, []), dtype="<u4").tobytes(),
                    }
                    for ext in sorted(members):
                        info = tarfile.TarInfo(f"{k:010d}.{ext}")
                        info.size = len(members[ext])
                        tar.addfile(info, io.BytesIO(members[ext]))
            data = buffer.getvalue()
            shard_name = f"{name}-{index:06d}.tar"
            (root / shard_name).write_bytes(data)
            shards.append({"name": shard_name, "first_key": key, "samples": count,
                           "tokens": count * (seq_len + 1), "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            key += count
        splits[name] = {"samples": key, "tokens": key * (seq_len + 1), "shards": shards}
        if text_bytes is not None:
            splits[name]["text_bytes"] = text_bytes[name]
    manifest = {"format": "pretrain-shards", "format_version": 1, "seq_len": seq_len,
                "token_dtype": "uint16", "eod_id": eod_id,
                "tokenizer": {"sha256": tokenizer_sha, "vocab_size": vocab_size, "path": None},
                "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
