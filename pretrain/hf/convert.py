"""The tensor mapping between our GPT and Hugging Face's Llama, Qwen2 and Qwen3 state dicts,
both ways: parameter names and layouts (config.json fields: families.py).

Our fused linear_qkv holds, per query group, its q heads then its k and v head ([groups *
(heads/groups + 2) * head_dim] rows, its bias alike); HF keeps q_proj, k_proj and v_proj
apart. SwiGLU's linear_fc1 is [gate; up]. Qwen3's q_norm/k_norm are our q_layernorm /
k_layernorm (one head_dim vector each, shared by every head).
"""

from __future__ import annotations

import torch

from pretrain.errors import CheckpointError


def _shape(model: dict) -> tuple[int, int, int]:
    """(heads, query groups, head_dim) of cfg.model as a dict (old checkpoints lack head_dim)."""
    heads = model["num_attention_heads"]
    groups = model.get("num_query_groups") or heads
    return heads, groups, model.get("head_dim") or model["hidden_size"] // heads


def ffn_size(model: dict) -> int:
    from pretrain.config import ModelConfig

    return ModelConfig(activation="swiglu", hidden_size=model["hidden_size"],
                       ffn_hidden_size=model.get("ffn_hidden_size", 0)).ffn_size


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Our [groups * (per_group + 2) * d, ...] -> (q, k, v) as HF's [n * d, ...] rows."""
    per_group = heads // groups
    rest = qkv.shape[1:]
    qkv_g = qkv.reshape(groups, per_group + 2, head_dim, *rest)
    return (qkv_g[:, :per_group].reshape(heads * head_dim, *rest),
            qkv_g[:, per_group].reshape(groups * head_dim, *rest),
            qkv_g[:, per_group + 1].reshape(groups * head_dim, *rest))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
              head_dim: int) -> torch.Tensor:
    rest = q.shape[1:]
    q_g = q.reshape(groups, heads // groups, head_dim, *rest)
    k_g, v_g = (t.reshape(groups, 1, head_dim, *rest) for t in (k, v))
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest)


def to_hf(state: dict[str, torch.Tensor], model: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our full-shape state (checkpoint/weights.py names) -> the HF family's state dict.
    The embedding (and output) rows beyond the tokenizer's vocabulary are padding and dropped."""
    heads, groups, head_dim = _shape(model)
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not model["tie_embeddings"]:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for i in range(model["num_layers"]):
        ours, hf = f"layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
        parts = ["weight"] + (["bias"] if model.get("qkv_bias") else [])
        for part in parts:
            q, k, v = _split_qkv(state[ours + "linear_qkv." + part], heads, groups, head_dim)
            out.update({f"{hf}q_proj.{part}": q, f"{hf}k_proj.{part}": k, f"{hf}v_proj.{part}": v})
        out[hf + "o_proj.weight"] = state[ours + "linear_proj.weight"]
        if model.get("qk_norm"):
            out[hf + "q_norm.weight"] = state[ours + "q_layernorm.weight"]
            out[hf + "k_norm.weight"] = state[ours + "k_layernorm.weight"]
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        gate, up = state[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = state[ours + "mlp.linear_fc2.weight"]
        out[hf + "input_layernorm.weight"] = state[ours + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "pre_mlp_layernorm.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(tensors: dict[str, torch.Tensor], model: dict, padded_vocab_size: int,
            where: str) -> dict[str, torch.Tensor]:
    """The HF family's state dict -> our full-shape state. Rows beyond the HF vocabulary
    (our padding) are zero: their logits are 0, not -inf, so they take a little probability
    until trained down; pick model.make_vocab_size_divisible_by so there are none."""
    heads, groups, head_dim = _shape(model)

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
        ours, hf = f"layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
        parts = ["weight"] + (["bias"] if model.get("qkv_bias") else [])
        for part in parts:
            state[ours + "linear_qkv." + part] = _join_qkv(
                *(get(f"{hf}{name}_proj.{part}") for name in "qkv"), heads, groups, head_dim)
        state[ours + "linear_proj.weight"] = get(hf + "o_proj.weight")
        if model.get("qk_norm"):
            state[ours + "q_layernorm.weight"] = get(hf + "q_norm.weight")
            state[ours + "k_layernorm.weight"] = get(hf + "k_norm.weight")
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        state[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0)
        state[ours + "mlp.linear_fc2.weight"] = get(hf + "mlp.down_proj.weight")
        state[ours + "input_layernorm.weight"] = get(hf + "input_layernorm.weight")
        state[ours + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight")
    return state
