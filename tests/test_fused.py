"""model.compile: the compiled regions (pretrain/model/fused.py) compute what megatron's
eager path computes, and a model built with them trains to the same numbers.

On the CPU the regions are compiled with dynamo's "aot_eager" backend: the same graph
capture (fullgraph, so a graph break fails the test) and autograd tracing as inductor,
without its C++ code generation, which would cost minutes here. Inductor itself runs in
the GPU-marked tests (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from pretrain.model import fused


@pytest.fixture
def aot_eager():
    fused.install("aot_eager")
    yield
    fused.uninstall()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [16, 12])  # 12 < head dim: a pass-through tail
def test_rope_is_megatrons_unfused_math(dtype, rot_dim):
    generator = torch.Generator().manual_seed(0)
    t = torch.randn(8, 2, 3, 16, generator=generator).to(dtype)
    freqs = torch.randn(8, 1, 1, rot_dim, generator=generator)
    expected = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    assert torch.equal(fused.rope_bshd(t, freqs), expected)


def test_compiled_regions_match_eager(aot_eager):
    generator = torch.Generator().manual_seed(1)
    t = torch.randn(8, 2, 4, 16, generator=generator, requires_grad=True)
    freqs = torch.randn(8, 1, 1, 16, generator=generator)
    eager = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), t)
    compiled = rope_utils.fused_apply_rotary_pos_emb(t, freqs, interleaved=False)
    (grad_compiled,) = torch.autograd.grad(compiled.square().sum(), t)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-6, atol=1e-6)

    x = torch.randn(8, 2, 32, generator=generator)
    weight = torch.rand(32, generator=generator) + 0.5
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-5),
                               torch.nn.functional.rms_norm(x, (32,), weight, 1e-5))


def _loss_and_grads(model, tokens):
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(input_ids=tokens, position_ids=position_ids, attention_mask=None,
                 labels=tokens.roll(-1, dims=1)).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_model_trains_like_eager(smoke_config, build_model, aot_eager):
    """The whole path: megatron routes RoPE, SwiGLU, the residual adds and the cross
    entropy through the compiled regions, and loss and every gradient agree with eager."""
    torch._dynamo.reset()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(2))
    (eager_model,) = build_model(smoke_config("model.compile=off"))
    (compiled_model,) = build_model(smoke_config("model.compile=on"))
    config = compiled_model.config
    assert config.apply_rope_fusion and config.bias_activation_fusion
    assert config.bias_dropout_fusion
    assert not config.cross_entropy_loss_fusion  # fp32 here: its bf16 logit gradient would round
    assert not eager_model.config.apply_rope_fusion

    loss_eager, grads_eager = _loss_and_grads(eager_model, tokens)
    calls = []
    real_rope = fused._state["rope"]
    fused._state["rope"] = lambda *a: calls.append(1) or real_rope(*a)
    try:
        loss_compiled, grads_compiled = _loss_and_grads(compiled_model, tokens)
    finally:
        fused._state["rope"] = real_rope
    assert len(calls) == 2 * smoke_config().model.num_layers  # q and k in every layer
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    for name, grad in grads_eager.items():
        error = (grads_compiled[name] - grad).abs().max().item()
        assert error <= 1e-6 * grad.abs().max().item(), (name, error, grad.abs().max().item())


def test_auto_is_on_with_cuda_only():
    assert fused.wanted("on") and not fused.wanted("off")
    assert fused.wanted("auto") == torch.cuda.is_available()
