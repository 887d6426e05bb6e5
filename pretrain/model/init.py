"""Layout-independent parameter initialization.

Every parameter is drawn from a generator seeded by (train.seed, its global name), at its
full unsharded shape, and this rank keeps its tensor-parallel slice. Layer names use the
global layer index, so a model split into 1 or 4 pipeline stages, or 1 or 8 TP shards,
starts from exactly the same function. That is what lets the parity tests compare layouts
bit-for-bit at step 0, and what a user expects when changing the layout of a run.

Rules (GPT-2 / megatron conventions): norm weights 1, biases 0, other matrices
N(0, init_std), the two residual-branch output projections N(0, init_std / sqrt(2 L)).
With tied embeddings the last pipeline stage's output layer is initialized under the
embedding's name, so both copies start equal without communication.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def global_names(model) -> dict[str, str]:
    """Local parameter name -> layout-independent name."""
    local_to_global = {}
    layers = model.decoder.layers
    for name, _ in model.named_parameters():
        out = name
        match = _LAYER.match(name)
        if match:
            layer = layers[int(match.group(1))]
            out = f"layers.{layer.layer_number - 1}." + name[match.end():]
        elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            out = "embedding.word_embeddings.weight"
        local_to_global[name] = out
    return local_to_global


def full_shape_and_slice(param: torch.Tensor, tp_rank: int, tp_size: int, gated: bool,
                         is_fc1: bool):
    """Full shape, and a function taking the full tensor to this rank's shard."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return tuple(param.shape), lambda full: full
    dim = param.partition_dim
    shape = list(param.shape)
    shape[dim] *= tp_size
    local = param.shape[dim]
    if gated and is_fc1:
        # SwiGLU fc1 stores [gate; up] per rank: rank r holds gate rows r and up rows r.
        half = shape[dim] // 2

        def take(full):
            gate, up = full.narrow(dim, 0, half), full.narrow(dim, half, half)
            part = local // 2
            return torch.cat([gate.narrow(dim, tp_rank * part, part),
                              up.narrow(dim, tp_rank * part, part)], dim=dim)
        return tuple(shape), take
    return tuple(shape), lambda full: full.narrow(dim, tp_rank * local, local)


def mark_tensor_parallel_attributes(model) -> None:
    """Tag TP-sharded weights with megatron's `tensor_model_parallel` / `partition_dim`.

    megatron sets these only inside its own initializers, which we skip
    (`perform_initialization=False`); the initializer below and DeepSpeed's global-norm
    accounting both depend on them. Biases of parallel linears are already tagged.
    """
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for module in model.modules():
        kind = type(module).__name__
        if "ColumnParallel" in kind or "VocabParallelEmbedding" in kind:
            dim = 0
        elif "RowParallel" in kind:
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


@torch.no_grad()
def initialize(model, cfg, tp_rank: int, tp_size: int) -> None:
    std = cfg.model.init_std
    residual_std = std / math.sqrt(2.0 * cfg.model.num_layers)
    gated = cfg.model.activation == "swiglu"
    names = global_names(model)
    mark_tensor_parallel_attributes(model)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        is_fc1 = "mlp.linear_fc1." in name
        shape, take = full_shape_and_slice(param, tp_rank, tp_size, gated, is_fc1)
        leaf = name.rsplit(".", 1)[-1]
        # Local norms are `...norm.weight`; Transformer Engine fuses them into the next linear
        # as `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_bias`.
        is_norm = "norm" in name
        if is_norm and leaf.endswith("weight"):
            param.fill_(1.0)
            continue
        if leaf.endswith("bias"):
            param.zero_()
            continue
        generator = torch.Generator().manual_seed(_seed_for(cfg.train.seed, name))
        scale = residual_std if ("linear_proj." in name or "linear_fc2." in name) else std
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)
        param.copy_(take(full).to(param.dtype))
