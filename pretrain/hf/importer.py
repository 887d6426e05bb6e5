"""`checkpoint.load_from=hf:DIR`: start a run from a Hugging Face Llama model directory
(weights only: fresh optimizer, step 0), under any TP/PP/DP layout.

config.json must describe the model this run's config builds; every difference is refused
with one line naming both fields and the fix. Weights are read from safetensors only (never
a pickle), into our full-shape state (hf_convert.from_hf), then each rank keeps its slice
(checkpoint/weights.install).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.errors import CheckpointError
from pretrain.hf.convert import check_llama_compatible, from_hf

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
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{path / 'config.json'}: model_type={config.get('model_type')!r}; "
                              f"only Llama-architecture models (model_type 'llama') import")
    return config


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise CheckpointError(f"config.json rope_type={kind!r}: scaled RoPE has no equivalent "
                              f"here; only default RoPE imports")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def check_fits(config: dict, cfg, padded_vocab_size: int, data_vocab_size: int, where: str) -> None:
    """Every architecture field of config.json against this run's config."""
    m = cfg.model
    check_llama_compatible(vars(m), f"this run's config (for {where})")
    heads = config["num_attention_heads"]
    pairs = [
        ("num_hidden_layers", config["num_hidden_layers"], "model.num_layers", m.num_layers),
        ("hidden_size", config["hidden_size"], "model.hidden_size", m.hidden_size),
        ("num_attention_heads", heads, "model.num_attention_heads", m.num_attention_heads),
        ("num_key_value_heads", config.get("num_key_value_heads") or heads,
         "model.num_query_groups", m.query_groups),
        ("intermediate_size", config["intermediate_size"], "model.ffn_hidden_size", m.ffn_size),
        ("rope_theta", _rope_theta(config), "model.rotary_base", float(m.rotary_base)),
        ("rms_norm_eps", float(config.get("rms_norm_eps", 1e-6)), "model.norm_eps", m.norm_eps),
        ("tie_word_embeddings", bool(config.get("tie_word_embeddings", False)),
         "model.tie_embeddings", m.tie_embeddings),
    ]
    for hf_key, hf_value, our_key, our_value in pairs:
        if hf_value != our_value:
            raise CheckpointError(f"{where}: config.json {hf_key}={hf_value} but {our_key}="
                                  f"{our_value} here; set {our_key}={hf_value}")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim != m.hidden_size // m.num_attention_heads:
        raise CheckpointError(f"{where}: config.json head_dim={head_dim} differs from "
                              f"hidden_size/num_attention_heads; such a model does not import")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise CheckpointError(f"{where}: config.json {key}={config[key]!r}; only {want!r} imports")
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
    return from_hf(read_safetensors(path), vars(cfg.model), padded_vocab_size, load_from)


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
