"""Local (non-Transformer-Engine) building blocks plugged into megatron-core's layer specs.

Two modules replace megatron's local defaults: a norm that supports sequence parallelism
(megatron's torch fallback refuses it; HeadNorm is its per-head q/k variant) and a core attention that calls torch's
scaled_dot_product_attention (flash / memory-efficient kernels on GPU, a fused CPU kernel
otherwise) instead of megatron's unfused softmax(QK^T)V. A third, the fixed sinusoidal
position table, stands in for megatron's learned one (it has none). llama3_inverse_frequencies
gives RoPE Llama 3.x's scaled frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from pretrain.model import fused


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm over the last dimension, as chosen by `config.normalization`.

    Under sequence parallelism each TP rank normalizes a different slice of the sequence, so
    the gradient of the (replicated) weight computed on one rank is partial. The weight
    enters the computation through megatron's copy-to-TP-region (identity forward, TP
    all-reduce backward), so autograd itself accumulates the full gradient on every rank,
    before any ZeRO hook partitions it. The parameters are also tagged
    `sequence_parallel=True`, as megatron's own norms are.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.sequence_parallel = bool(config.sequence_parallel)
        for param in self.parameters():
            setattr(param, "sequence_parallel", self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.sequence_parallel:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
            if bias is not None:
                bias = tensor_parallel.copy_to_tensor_model_parallel_region(bias)
        # compiled under model.compile (fused.py), else exactly F.rms_norm / F.layer_norm
        if self.rms:
            return fused.rms_norm(x, weight, self.eps)
        return fused.layer_norm(x, weight, bias, self.eps)


class HeadNorm(Norm):
    """The q/k norm (model.qk_norm): one weight of head_dim, shared by every head.

    Each TP rank normalizes its own heads with the replicated weight, so its gradient there
    is partial whether or not the sequence is split: the weight always passes megatron's
    copy-to-TP-region (identity forward, TP all-reduce backward; a no-op at TP1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.weight)
        if self.rms:
            return fused.rms_norm(x, weight, self.eps)
        bias = tensor_parallel.copy_to_tensor_model_parallel_region(self.bias)
        return fused.layer_norm(x, weight, bias, self.eps)


def llama3_inverse_frequencies(inverse_frequency: torch.Tensor, factor: float,
                               low_freq_factor: float, high_freq_factor: float,
                               original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.x's RoPE scaling (Meta's reference model, `apply_scaling`): wavelengths
    shorter than original/high_freq_factor keep their frequency, those longer than
    original/low_freq_factor are slowed by `factor`, and the band between blends the two
    linearly in original/wavelength. megatron's RotaryEmbedding fixes all but `factor`
    (1, 4, 8192 = Llama 3.1), so Llama 3.2's and small test models' settings are done here."""
    wavelength = 2 * math.pi / inverse_frequency
    low_wavelength = original_max_position_embeddings / low_freq_factor
    high_wavelength = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) \
        / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inverse_frequency / factor + smooth * inverse_frequency
    scaled = torch.where(wavelength > low_wavelength, inverse_frequency / factor, inverse_frequency)
    middle = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(middle, blended, scaled)


def document_block_mask(segment_ids_bs: torch.Tensor):
    """flex attention's BlockMask for causal attention within each packed document: what
    data/loader.py's document_causal_mask says, without materializing [b, 1, s, s]. Blocks
    wholly inside another document are skipped, not computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = segment_ids_bs.shape

    def same_document_causal(batch, head, q_index, kv_index):
        return (q_index >= kv_index) & (segment_ids_bs[batch, q_index]
                                        == segment_ids_bs[batch, kv_index])

    return create_block_mask(same_document_causal, b, None, s, s, device=segment_ids_bs.device)


_compiled_flex = None
_last_mask: tuple = (None, None)  # (segment ids, their BlockMask): one build per micro-batch


def _flex_attention(query, key, value, block_mask, scale, gqa):
    """Compiled on CUDA (eager flex materializes the scores and has no fused backward);
    eager elsewhere, which is only the forward-only CPU check of tests/test_document_mask.py."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale,
                              enable_gqa=gqa)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                          enable_gqa=gqa)


class SDPAttention(MegatronModule):
    """Causal core attention through `torch.nn.functional.scaled_dot_product_attention`.

    Same interface as megatron's DotProductAttention: q is [s, b, heads/tp, d], k and v are
    [s, b, groups/tp, d]; returns [s, b, heads/tp * d]. GQA is handled by SDPA itself.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism")
        tp_size = tensor_parallel.get_tensor_model_parallel_world_size() if pg_collection is None \
            else pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias unsupported")
        # [s, b, n, d] -> [b, n, s, d]
        q_bnsd, k_bnsd, v_bnsd = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.heads_per_partition != self.groups_per_partition
        # Dropout must differ across TP ranks (different heads) and match across DP replicas:
        # the model-parallel RNG fork gives exactly that, as in megatron's attention.
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            # [b, s] segment ids (data.document_mask=flex): flex attention over a block mask
            # built once per micro-batch, every layer (and a recompute) reusing it.
            global _last_mask
            if _last_mask[0] is not attention_mask:
                _last_mask = (attention_mask, document_block_mask(attention_mask))
            out_bnsd = _flex_attention(q_bnsd, k_bnsd, v_bnsd, _last_mask[1],
                                       self.softmax_scale, gqa)
            s, b = query.shape[0], query.shape[1]
            return out_bnsd.permute(2, 0, 1, 3).reshape(s, b, -1)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            if attention_mask is None:
                out_bnsd = F.scaled_dot_product_attention(
                    q_bnsd, k_bnsd, v_bnsd, dropout_p=dropout_p, is_causal=True,
                    scale=self.softmax_scale, enable_gqa=gqa)
            else:
                # megatron's masks are True where attention is *forbidden*; SDPA wants allowed.
                out_bnsd = F.scaled_dot_product_attention(
                    q_bnsd, k_bnsd, v_bnsd, attn_mask=~attention_mask, dropout_p=dropout_p,
                    scale=self.softmax_scale, enable_gqa=gqa)
        s, b = query.shape[0], query.shape[1]
        # [b, n, s, d] -> [s, b, n*d]
        return out_bnsd.permute(2, 0, 1, 3).reshape(s, b, -1)


class SinusoidalPositionEmbedding(torch.nn.Module):
    """Vaswani et al. (2017) positions: dimension 2i holds sin(pos / 10000^(2i/h)), 2i+1 the
    cosine. No parameters: it takes the place of the learned table in megatron's embedding
    (`position_ids [b, s] -> [b, s, h]`, added to the word embedding), computed in fp32 from
    the positions, so document-reset positions work as they do for RoPE."""

    BASE = 10000.0

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size, self.dtype = hidden_size, dtype

    def forward(self, position_ids_bs: torch.Tensor) -> torch.Tensor:
        half = torch.arange(0, self.hidden_size, 2, dtype=torch.float32,
                            device=position_ids_bs.device)
        inverse_frequency = self.BASE ** (-half / self.hidden_size)  # [h/2]
        angles_bsk = position_ids_bs.float().unsqueeze(-1) * inverse_frequency
        table_bskt = torch.stack([angles_bsk.sin(), angles_bsk.cos()], dim=-1)  # [b, s, h/2, 2]
        return table_bskt.flatten(-2).to(self.dtype)
