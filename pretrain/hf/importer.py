"""`checkpoint.load_from=hf:DIR`: start a run from a Hugging Face Llama, Qwen2 or Qwen3 model
directory (weights only: fresh optimizer, step 0), under any TP/PP/DP layout.

config.json must describe the model this run's config builds; every difference is refused
with one line naming both fields and the fix. Weights are read from safetensors only (never
a pickle), into our full-shape state (convert.from_hf), then each rank keeps its slice
(checkpoint/weights.install).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.errors import CheckpointError
from pretrain.hf.convert import from_hf
from pretrain.hf.families import HF_NAMES, check_exportable, family_of, model_fields

PREFIX = "hf:"


def is_hf(load_from: str) -> bool:
    return load_from.startswith(PREFIX)


def hf_dir(load_from: str) -> Path:
    path = Path(load_from[len(PREFIX):])
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint.load_from={load_from}: no config.json there; point it "
                              f"at a Hugging Face model directory (save_pretrained output)")
    return path


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({err})") from None
    return config


def check_fits(config: dict, cfg, padded_vocab_size: int, data_vocab_size: int, where: str) -> None:
    """Every architecture field of config.json against this run's config."""
    m = cfg.model
    check_exportable(vars(m), f"this run's config (for {where})")
    ours = {**vars(m), "num_query_groups": m.query_groups, "head_dim": m.kv_channels,
            "ffn_hidden_size": m.ffn_size}
    for key, value in model_fields(config, where).items():
        if ours[key] != value:
            hf_key = HF_NAMES.get(key, key)
            hf_value = family_of(config, where) if hf_key == "model_type" else value
            raise CheckpointError(f"{where}: config.json {hf_key}={hf_value!r} but model.{key}="
                                  f"{ours[key]!r} here; set model.{key}={value!r}")
    vocab = config["vocab_size"]
    if vocab > padded_vocab_size:
        raise CheckpointError(f"{where}: config.json vocab_size={vocab} exceeds this run's "
                              f"{padded_vocab_size} rows; set model.vocab_size={vocab}")
    if vocab < data_vocab_size:
        raise CheckpointError(f"{where}: config.json vocab_size={vocab} is smaller than the data's "
                              f"tokenizer ({data_vocab_size}); tokenize the data with the model's "
                              f"tokenizer")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                              f"save the model with save_pretrained(safe_serialization=True)")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: listed in the index but missing")
        tensors.update(load_file(str(path / name)))
    return tensors


def load_state(load_from: str, cfg, padded_vocab_size: int, data_vocab_size: int) -> dict:
    """The HF model `load_from` names as our full-shape state, checked against cfg."""
    path = hf_dir(load_from)
    config = read_config(path)
    check_fits(config, cfg, padded_vocab_size, data_vocab_size, load_from)
    model = {**vars(cfg.model), "head_dim": cfg.model.kv_channels}
    return from_hf(read_safetensors(path), model, padded_vocab_size, load_from)


def initial_weights(cfg, padded_vocab_size: int, data_vocab_size: int):
    """For the Checkpointer (its `initial_weights`): with `checkpoint.load_from=hf:DIR`, a
    callable returning (DIR, the model's full-shape state), called only when the run has no
    checkpoint of its own; else None."""
    load_from = cfg.checkpoint.load_from
    if not (load_from and is_hf(load_from)):
        return None

    def read() -> tuple[Path, dict]:
        path = hf_dir(load_from)
        return path, load_state(load_from, cfg, padded_vocab_size, data_vocab_size)

    return read
