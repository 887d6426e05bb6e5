"""Compiled regions for the elementwise work between the matmuls (`model.compile`).

On an H200 about a third of the 1b model's GPU time was unfused elementwise kernels: RoPE
built with `cat`, SwiGLU, RMSNorm, residual adds, dtype copies (../shared/notes/gpu-facts.md).
Compiling whole megatron layers does not work there: every `TransformerLayer` is its own
module with its own `layer_number`, so dynamo recompiles per layer until its limit. Here
the small *functions* are compiled instead: one graph per input shape, built on the first
layer and reused by every other layer, chunk and micro-batch.

- RoPE: megatron routes `apply_rope_fusion` to a module-level `fused_apply_rotary_pos_emb`
  that only Transformer Engine fills; without TE we fill that slot with a compiled function
  of the same signature and the same math as megatron's unfused path.
- RMSNorm / LayerNorm: our `Norm` (layers.py) calls the compiled functions below.
- SwiGLU and bias-dropout-add: megatron's own `bias_activation_fusion` and
  `bias_dropout_fusion` paths, whose kernels megatron already wraps in `torch.compile`.
- Cross entropy: megatron's `cross_entropy_loss_fusion` (native, also compiled), in bf16.

`model.compile: auto` turns this on with CUDA only: on the CPU, inductor's C++ build costs
more than it saves for the test-sized models, and eager keeps the parity suite's bits.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Set by `install()`: the compiled callables, or None (eager).
_state: dict = {"backend": None, "rope": None, "rms_norm": None, "layer_norm": None}


def wanted(setting: str) -> bool:
    """`model.compile` -> whether the compiled regions are used in this process."""
    return setting == "on" or (setting == "auto" and torch.cuda.is_available())


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron's unfused RoPE for [s, b, n, d] (mscale 1, halves not interleaved), written
    as one expression so a compiler can fuse the cos/sin, the rotation and both `cat`s."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _fused_rope_slot(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
                     **_unused) -> torch.Tensor:
    """The signature megatron calls `fused_apply_rotary_pos_emb` with."""
    if interleaved:  # the config has no interleaved RoPE; a guard for other callers
        raise NotImplementedError("compiled RoPE implements non-interleaved halves only")
    return _state["rope"](t, freqs)


def install(backend: str | None = None) -> None:
    """Compile the regions with `backend` (default inductor; tests install "aot_eager"
    first: the same graph capture and autograd tracing without code generation) and plug
    RoPE into megatron's slot. Without `backend`, an earlier install stays. Call before
    building the TransformerConfig (megatron checks the slot when `apply_rope_fusion` is set)."""
    from megatron.core.models.common.embeddings import rope_utils

    if _state["backend"] is not None and backend in (None, _state["backend"]):
        return
    backend = backend or "inductor"
    compile_ = functools.partial(torch.compile, backend=backend, fullgraph=True, dynamic=False)
    _state.update(backend=backend, rope=compile_(rope_bshd), rms_norm=compile_(_rms_norm),
                  layer_norm=compile_(_layer_norm))
    if rope_utils.fused_apply_rotary_pos_emb is None or rope_utils.fused_apply_rotary_pos_emb \
            is _fused_rope_slot:
        rope_utils.fused_apply_rotary_pos_emb = _fused_rope_slot
    # Several layers (and the q and k shapes under GQA) share each graph; the default limit
    # of 8 recompiles is for genuinely new shapes (evaluation batches, the last micro-batch).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


def uninstall() -> None:
    """Back to eager (tests)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is _fused_rope_slot:
        rope_utils.fused_apply_rotary_pos_emb = None
    _state.update(backend=None, rope=None, rms_norm=None, layer_norm=None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fn = _state["rms_norm"] or _rms_norm
    return fn(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    fn = _state["layer_norm"] or _layer_norm
    return fn(x, weight, bias, eps)


def transformer_config_flags(enabled: bool, gated: bool, bias: bool, bf16: bool) -> dict:
    """The TransformerConfig switches that route megatron through the compiled regions
    (installed first). megatron fuses a non-gated GeLU only together with a bias, and its
    fused cross entropy returns the logits' gradient in bf16 whatever their dtype: exact
    for bf16 logits, a rounding of fp32 ones, so fp32 runs keep the unfused loss."""
    return {"bias_dropout_fusion": enabled,
            "bias_activation_fusion": enabled and (gated or bias),
            "apply_rope_fusion": enabled,
            "cross_entropy_loss_fusion": enabled and bf16,
            "cross_entropy_fusion_impl": "native"}
