"""The mapping between our GPT and Hugging Face's Llama architecture, both ways: config
fields, parameter names and tensor layouts (used by export_hf.py and hf_import.py).

Our model is exactly Llama when it uses RoPE (non-interleaved, as HF's rotate_half),
RMSNorm, SwiGLU and no biases; GQA and tied or untied embeddings map one to one. Learned
positions, LayerNorm, GELU and biases have no faithful Llama equivalent: they are refused
with one line naming the setting rather than exported as a model that computes something else.
"""

from __future__ import annotations

import torch

from pretrain.errors import CheckpointError

# setting -> (value Llama needs, why)
LLAMA_NEEDS = {
    "position_embedding": ("rope", "Llama has no learned position table"),
    "normalization": ("rmsnorm", "Llama uses RMSNorm"),
    "activation": ("swiglu", "Llama's MLP is SwiGLU"),
    "bias": (False, "Llama here is exported without biases"),
}


def check_llama_compatible(model: dict, where: str) -> None:
    for key, (value, why) in LLAMA_NEEDS.items():
        if model.get(key) != value:
            raise CheckpointError(f"{where}: model.{key}={model.get(key)!r} has no faithful "
                                  f"Hugging Face Llama equivalent ({why}); only models with "
                                  f"model.{key}={value!r} export")


def _groups(model: dict) -> int:
    return model.get("num_query_groups") or model["num_attention_heads"]


def _ffn(model: dict) -> int:
    from pretrain.config import ModelConfig

    return ModelConfig(activation="swiglu", hidden_size=model["hidden_size"],
                       ffn_hidden_size=model.get("ffn_hidden_size", 0)).ffn_size


def llama_config(model: dict, vocab_size: int, special_ids: dict, dtype: str) -> dict:
    """config.json of a LlamaForCausalLM equal to our model (model: cfg.model as a dict)."""
    heads = model["num_attention_heads"]
    base = float(model.get("rotary_base", 10000))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": model["hidden_size"],
        "intermediate_size": _ffn(model),
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": _groups(model),
        "head_dim": model["hidden_size"] // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_length"],
        "rms_norm_eps": float(model.get("norm_eps", 1e-5)),
        # transformers < 5 reads rope_theta, 5.x rope_parameters; both say the same.
        "rope_theta": base,
        "rope_parameters": {"rope_type": "default", "rope_theta": base},
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": float(model.get("init_std", 0.02)),
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def to_hf(state: dict[str, torch.Tensor], model: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our full-shape state (checkpoint/weights.py names) -> LlamaForCausalLM's state dict.
    The embedding (and output) rows beyond the tokenizer's vocabulary are padding and dropped."""
    heads, groups = model["num_attention_heads"], _groups(model)
    head_dim = model["hidden_size"] // heads
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not model["tie_embeddings"]:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for i in range(model["num_layers"]):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        qkv = state[ours + "self_attention.linear_qkv.weight"]
        hidden = qkv.shape[1]
        # [groups * (per_group + 2) * d, h] -> per group: its q heads, then k, then v
        qkv_g = qkv.reshape(groups, per_group + 2, head_dim, hidden)
        out[hf + "self_attn.q_proj.weight"] = qkv_g[:, :per_group].reshape(heads * head_dim, hidden)
        out[hf + "self_attn.k_proj.weight"] = qkv_g[:, per_group].reshape(groups * head_dim, hidden)
        out[hf + "self_attn.v_proj.weight"] = qkv_g[:, per_group + 1].reshape(groups * head_dim, hidden)
        out[hf + "self_attn.o_proj.weight"] = state[ours + "self_attention.linear_proj.weight"]
        gate, up = state[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = state[ours + "mlp.linear_fc2.weight"]
        out[hf + "input_layernorm.weight"] = state[ours + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "pre_mlp_layernorm.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(tensors: dict[str, torch.Tensor], model: dict, padded_vocab_size: int,
            where: str) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> our full-shape state. Rows beyond the HF vocabulary
    (our padding) are zero: their logits are 0, not -inf, so they take a little probability
    until trained down; pick model.make_vocab_size_divisible_by so there are none."""
    heads, groups = model["num_attention_heads"], _groups(model)
    head_dim = model["hidden_size"] // heads

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{where}: the weights have no {name}")
        return tensors[name].float()

    def pad_rows(weight: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(padded_vocab_size, weight.shape[1], dtype=weight.dtype)
        padded[:weight.shape[0]] = weight
        return padded

    embed = get("model.embed_tokens.weight")
    state = {"embedding.word_embeddings.weight": pad_rows(embed),
             "decoder.final_layernorm.weight": get("model.norm.weight")}
    if not model["tie_embeddings"]:
        head = tensors.get("lm_head.weight")
        state["output_layer.weight"] = pad_rows(embed if head is None else head.float())
    for i in range(model["num_layers"]):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q = get(hf + "self_attn.q_proj.weight")
        hidden = q.shape[1]
        q_g = q.reshape(groups, heads // groups, head_dim, hidden)
        k_g = get(hf + "self_attn.k_proj.weight").reshape(groups, 1, head_dim, hidden)
        v_g = get(hf + "self_attn.v_proj.weight").reshape(groups, 1, head_dim, hidden)
        state[ours + "self_attention.linear_qkv.weight"] = torch.cat([q_g, k_g, v_g], dim=1) \
            .reshape(-1, hidden)
        state[ours + "self_attention.linear_proj.weight"] = get(hf + "self_attn.o_proj.weight")
        state[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0)
        state[ours + "mlp.linear_fc2.weight"] = get(hf + "mlp.down_proj.weight")
        state[ours + "input_layernorm.weight"] = get(hf + "input_layernorm.weight")
        state[ours + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight")
    return state
