"""The Hugging Face model families we read and write (Llama 2/3.x, Qwen2/2.5, Qwen3) and how
each one's config.json spells our model settings, both ways (tensors: convert.py).

All three are one decoder: RoPE, RMSNorm, SwiGLU, GQA, tied or untied embeddings. They differ
in three switches: Qwen2 has q/k/v biases (no output bias), Qwen3 a per-head RMSNorm on q and
k, and Llama 3.x scales RoPE's frequencies (rope_type llama3). What none of them can express
(sliding windows, other RoPE scalings, an output-projection bias, ...) is refused in one line.
"""

from __future__ import annotations

from pretrain.errors import CheckpointError

# model_type -> the architecture config.json names
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# settings every family needs -> (value, why)
DECODER_NEEDS = {
    "position_embedding": ("rope", "they have no learned or sinusoidal position table"),
    "normalization": ("rmsnorm", "they use RMSNorm"),
    "activation": ("swiglu", "their MLP is SwiGLU"),
    "bias": (False, "their MLPs and output projections have no biases"),
}
# our model.* setting -> how config.json spells it (the error messages name both)
HF_NAMES = {"num_layers": "num_hidden_layers", "num_query_groups": "num_key_value_heads",
            "ffn_hidden_size": "intermediate_size", "rotary_base": "rope_theta",
            "rope_scaling": "rope_parameters", "norm_eps": "rms_norm_eps",
            "tie_embeddings": "tie_word_embeddings", "qkv_bias": "model_type",
            "qk_norm": "model_type"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_exportable(model: dict, where: str) -> str:
    """The family (model_type) our model (cfg.model as a dict) exports as, or one line why none."""
    for key, (value, why) in DECODER_NEEDS.items():
        if model.get(key) != value:
            raise CheckpointError(f"{where}: model.{key}={model.get(key)!r} has no faithful "
                                  f"Hugging Face Llama/Qwen equivalent ({why}); only models with "
                                  f"model.{key}={value!r} export")
    qkv_bias, qk_norm = model.get("qkv_bias", False), model.get("qk_norm", False)
    if qkv_bias and qk_norm:
        raise CheckpointError(f"{where}: model.qkv_bias=true with model.qk_norm=true has no "
                              f"Hugging Face equivalent (Qwen2 has the biases, Qwen3 the norms)")
    return "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"


def _head_dim(model: dict) -> int:
    return model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]


def hf_config(model: dict, ffn_size: int, vocab_size: int, special_ids: dict, dtype: str) -> dict:
    """config.json of the Hugging Face model equal to ours (model: cfg.model as a dict)."""
    family = check_exportable(model, "export")
    base = float(model.get("rotary_base", 10000))
    rope = {"rope_type": "default", "rope_theta": base}
    scaling = model.get("rope_scaling") or {}
    if scaling:
        rope = {"rope_type": "llama3", "rope_theta": base,
                **{key: scaling[key] for key in LLAMA3_KEYS}}
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": model["hidden_size"],
        "intermediate_size": ffn_size,
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model.get("num_query_groups") or model["num_attention_heads"],
        "head_dim": _head_dim(model),
        "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_length"],
        "rms_norm_eps": float(model.get("norm_eps", 1e-5)),
        # transformers < 5 reads rope_theta (+ rope_scaling), 5.x rope_parameters
        "rope_theta": base,
        "rope_parameters": rope,
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "attention_dropout": 0.0,
        "initializer_range": float(model.get("init_std", 0.02)),
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if scaling:
        config["rope_scaling"] = dict(rope)
    if family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2's q/k/v biases are implied by the family; Qwen3 spells them off
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=model["num_layers"])
        if family == "qwen3":
            config["attention_bias"] = False
    return config


def family_of(config: dict, where: str) -> str:
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        raise CheckpointError(f"{where}: config.json model_type={family!r}; only "
                              f"{', '.join(map(repr, ARCHITECTURES))} (Llama 2/3.x, Qwen2/2.5, "
                              f"Qwen3) import")
    architectures = config.get("architectures") or [ARCHITECTURES[family]]
    if architectures != [ARCHITECTURES[family]]:
        raise CheckpointError(f"{where}: config.json architectures={architectures}; only "
                              f"{ARCHITECTURES[family]} imports for model_type {family!r}")
    return family


def _rope(config: dict, where: str) -> tuple[float, dict]:
    """(rope_theta, our model.rope_scaling) from transformers 5's rope_parameters or 4.x's
    rope_theta + rope_scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, {}
    if kind != "llama3":
        raise CheckpointError(f"{where}: config.json rope_type={kind!r} is not supported; only "
                              f"default and llama3 RoPE import")
    missing = [key for key in LLAMA3_KEYS if key not in params]
    if missing:
        raise CheckpointError(f"{where}: config.json llama3 RoPE scaling lacks {', '.join(missing)}")
    return theta, {"type": "llama3", **{key: params[key] for key in LLAMA3_KEYS}}


REQUIRED_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim")


def _check_types(config, where: str) -> None:
    """config.json comes from outside: a missing key or a value of the wrong type is one line
    naming it, not a KeyError or TypeError from the arithmetic below."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json holds a {type(config).__name__}, not a JSON "
                              f"object")

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for key in REQUIRED_INTS + OPTIONAL_INTS:
        value = config.get(key)
        if key not in config and key in REQUIRED_INTS:
            raise CheckpointError(f"{where}: config.json has no {key}; it is not a complete "
                                  f"model config (save the model with save_pretrained)")
        if not (whole(value) or (key in OPTIONAL_INTS and value is None)):
            raise CheckpointError(f"{where}: config.json {key}={value!r} is not a positive "
                                  f"integer")
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{where}: config.json rms_norm_eps={eps!r} is not a number in "
                              f"(0, 1)")


def model_fields(config: dict, where: str) -> dict:
    """Our model.* architecture settings equal to config.json's model, or one line naming
    what we cannot build."""
    _check_types(config, where)
    family = family_of(config, where)
    refuse = [("hidden_act", config.get("hidden_act", "silu"), "silu"),
              ("mlp_bias", config.get("mlp_bias", False), False),
              ("use_sliding_window", config.get("use_sliding_window", False), False)]
    if family != "qwen2":  # Qwen2's biases are q/k/v only; elsewhere the flag adds o_proj's too
        refuse.append(("attention_bias", config.get("attention_bias", False), False))
    for key, value, want in refuse:
        if value != want:
            raise CheckpointError(f"{where}: config.json {key}={value!r}; only {want!r} imports")
    theta, scaling = _rope(config, where)
    if not theta.is_integer():
        raise CheckpointError(f"{where}: config.json rope_theta={theta} is not a whole number "
                              f"(model.rotary_base is)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or (128 if family == "qwen3" else config["hidden_size"] // heads)
    return {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "ffn_hidden_size": config["intermediate_size"],
        "rotary_base": int(theta),
        "rope_scaling": scaling,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "qkv_bias": family == "qwen2",
        "qk_norm": family == "qwen3",
        **{key: value for key, (value, _) in DECODER_NEEDS.items()},
    }
