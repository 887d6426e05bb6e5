"""Build this rank's GPT model chunks with megatron-core.

One chunk per virtual pipeline stage (one in total without interleaving). Which layers a
chunk holds, and whether it owns the embedding or the output layer, follows from
megatron's parallel_state; which implementation backs each submodule comes from spec.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.config import Config
from pretrain.model import fused, init as model_init
from pretrain.model.layers import SinusoidalPositionEmbedding, llama3_inverse_frequencies
from pretrain.model.spec import choose_backend, decoder_block_spec


def transformer_config(cfg: Config, params_dtype: torch.dtype) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    compiled = fused.wanted(m.compile)
    if compiled:
        fused.install()  # before TransformerConfig: megatron checks the RoPE slot there
    recompute = {}
    if p.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1}
    elif p.recompute == "selective":
        recompute = {"recompute_granularity": "selective",
                     "recompute_modules": list(p.recompute_modules)}
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.kv_channels,
        normalization="RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.bias,
        add_qkv_bias=m.bias or m.qkv_bias,
        qk_layernorm=m.qk_norm,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(p.virtual_pipeline_chunks
                                              if p.virtual_pipeline_chunks > 1 else None),
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Parameters are (re)initialized by model/init.py; skip megatron's own draw.
        perform_initialization=False,
        use_cpu_initialization=True,
        # These need apex or TE-only CUDA kernels; SDPA fuses the softmax.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # model.compile: RoPE, SwiGLU, residual adds and cross entropy through compiled
        # regions (model/fused.py); eager otherwise.
        **fused.transformer_config_flags(compiled, gated=m.activation == "swiglu", bias=m.bias,
                                         bf16=params_dtype == torch.bfloat16),
        # Batched isend/irecv carry no tags; over gloo, when both directions between the same
        # two ranks are in flight (interleaved steady state), an activation and a gradient of
        # the same shape can land in each other's buffers. The unbatched path orders the ops
        # by rank parity and is exact. NCCL groups batched ops correctly, so GPUs keep it.
        batch_p2p_comm=torch.cuda.is_available(),
        **recompute,
    )


def build_model_chunks(cfg: Config, padded_vocab_size: int, params_dtype: torch.dtype,
                       device: torch.device) -> list[GPTModel]:
    """This rank's chunks, initialized identically whatever the TP/PP layout."""
    tconfig = transformer_config(cfg, params_dtype)
    backend = choose_backend(cfg.model.backend, document_masks=cfg.data.reset_attention)
    chunks = []
    vp = cfg.parallel.virtual_pipeline_chunks
    for vp_stage in range(vp):
        stage = vp_stage if vp > 1 else None
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=decoder_block_spec(tconfig, backend, stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=cfg.model.max_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            # sinusoidal: megatron's learned slot, its table swapped for the fixed one below
            position_embedding_type=("rope" if cfg.model.position_embedding == "rope"
                                     else "learned_absolute"),
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
        )
        if cfg.model.rope_scaling:
            _scale_rope(model, cfg.model.rope_scaling)
        if cfg.model.position_embedding == "sinusoidal" and model.pre_process:
            model.embedding.position_embeddings = SinusoidalPositionEmbedding(
                cfg.model.hidden_size, params_dtype)
        model_init.initialize(model, cfg, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                              tp_size=cfg.parallel.tensor_parallel)
        _mark_pipeline_replicated(model)
        chunks.append(model.to(device))
    return chunks


def _scale_rope(model: GPTModel, scaling: dict) -> None:
    """Llama 3.x frequencies in place of megatron's plain ones (before any forward: the
    rotary module caches its tables per sequence length)."""
    rotary = model.rotary_pos_emb
    rotary.inv_freq = llama3_inverse_frequencies(
        rotary.inv_freq, float(scaling["factor"]), float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]), scaling["original_max_position_embeddings"])


def _mark_pipeline_replicated(model: GPTModel) -> None:
    """With tied embeddings and PP>1 the last stage holds a copy of the word embedding.
    DeepSpeed must not count its gradient twice in the global norm."""
    if model.post_process and not model.pre_process and model.share_embeddings_and_output_weights:
        weight = model.output_layer.weight
        weight.ds_pipe_replicated = True


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters this rank holds (each TP shard counted at its local size)."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
