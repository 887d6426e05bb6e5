"""The one place that decides which implementation backs each transformer submodule.

Transformer Engine (fused kernels, fp8-ready) when it is importable and CUDA is present;
otherwise megatron's local tensor-parallel linears with our SDPA attention and norm. Model
code never branches on the backend: it receives the spec built here.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from pretrain.model.layers import HeadNorm, Norm, SDPAttention


def transformer_engine_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def choose_backend(requested: str, document_masks: bool = False) -> str:
    """'auto' -> 'te' when usable, else 'local'. An explicit 'te' without TE is an error.

    Per-document attention masks (data.reset_attention) need the local SDPA attention: the TE
    spec's causal attention would ignore an explicit mask."""
    from pretrain.config import ConfigError

    if requested == "auto":
        return "te" if transformer_engine_usable() and not document_masks else "local"
    if requested == "te" and not transformer_engine_usable():
        raise ConfigError("model.backend=te needs transformer_engine and a CUDA device; "
                          "use model.backend=auto or local")
    if requested == "te" and document_masks:
        raise ConfigError("data.reset_attention=true needs model.backend=local (or auto): the "
                          "Transformer Engine spec here runs plain causal attention")
    return requested


def local_layer_spec(qk_norm: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=HeadNorm if qk_norm else IdentityOp,
                    k_layernorm=HeadNorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec(qk_norm: bool = False) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    if qk_norm:  # ours: its weight gradient is summed over the TP ranks' heads (layers.py)
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = HeadNorm
    return spec


def decoder_block_spec(transformer_config, backend: str, vp_stage: int | None):
    """Layer specs for the layers this pipeline stage (and virtual chunk) builds."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = te_layer_spec(transformer_config.qk_layernorm), TENorm
    else:
        layer, final_norm = local_layer_spec(transformer_config.qk_layernorm), Norm
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
