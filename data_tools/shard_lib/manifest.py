"""manifest.json of a shard directory (docs/formats.md): building it in shard.py and reading it
back, with the format checks every reader makes, in inspect_shards.py."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.sources import SHARD_NAME_RE  # noqa: F401 - one definition, for readers too

FORMAT = "pretrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
RESHARD = "re-run data_tools/shard.py"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of a format this code does not know."""


def build(*, seq_len: int, token_dtype: str, eod_id: int, tokenizer: dict, splits: dict,
          documents: dict, tokens_dropped_tail: dict, settings: dict, inputs: list) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len,
            "token_dtype": token_dtype, "eod_id": eod_id, "tokenizer": tokenizer,
            "splits": splits, "documents": documents, "tokens_dropped_tail": tokens_dropped_tail,
            "settings": settings, "inputs": inputs}


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def load(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: {directory} is not a finished dataset; "
                            f"{RESHARD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); {RESHARD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path}: format {found!r} is not {FORMAT!r}; {RESHARD}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                            f"one this code reads ({FORMAT_VERSION}); {RESHARD} or update")
    for field in ("seq_len", "token_dtype", "eod_id", "tokenizer", "splits"):
        if field not in manifest:
            raise ManifestError(f"{path}: missing field {field!r}; {RESHARD}")
    return manifest
