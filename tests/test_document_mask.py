"""data.document_mask=flex: per-document causal attention from the segment ids through flex
attention's block mask, with no [b, 1, s, s] tensor. On CPU flex attention runs forward only
(its backward is compiled for CUDA), so the CPU check is the model's forward against the dense
mask; the GPU check (skipped here) compares gradients and counts the tensors allocated."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, load_config, validate
from pretrain.data.loader import document_causal_mask
from tests.conftest import SMOKE

SEQ = 64


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 257, (2, SEQ), generator=g)
    segments = torch.zeros(2, SEQ, dtype=torch.int32)
    segments[0, 20:], segments[0, 45:], segments[1, 9:] = 1, 2, 1  # documents of 20, 25, 19...
    starts = torch.zeros(2, SEQ, dtype=torch.int64)
    starts[:, 1:] = (segments[:, 1:] != segments[:, :-1]).long()
    positions = torch.arange(SEQ).unsqueeze(0).repeat(2, 1)
    positions = positions - torch.cummax(positions * starts, dim=1).values
    return (t.to(device) for t in (tokens, segments, positions))


def _model(device, dtype, overrides=()):
    from pretrain.model.gpt import build_model_chunks

    cfg = load_config(SMOKE, ["model.hidden_size=128", "train.seq_length=64",
                              "data.reset_attention=true", "model.backend=local", *overrides])
    layout = validate(cfg, world_size=1, vocab_size=257, cuda=device == "cuda")
    (model,) = build_model_chunks(cfg, layout.padded_vocab_size, dtype, torch.device(device))
    return model


def test_flex_forward_equals_the_dense_mask_on_cpu(single_rank_parallel):
    model = _model("cpu", torch.float32)
    tokens, segments, positions = _batch()
    with torch.no_grad():
        dense = model(tokens, positions, document_causal_mask(segments), labels=None)
        flex = model(tokens, positions, segments, labels=None)
        causal_only = model(tokens, positions, None, labels=None)
    assert (flex - dense).abs().max() < 1e-5
    assert (causal_only - dense).abs().max() > 1e-3  # the documents really are separated


@pytest.mark.parametrize("overrides, cuda, needle", [
    (["data.reset_attention=true", "data.document_mask=flex"], False, "needs a CUDA device"),
    (["data.reset_attention=true", "data.document_mask=flex", "model.dropout=0.1"], True,
     "has no attention dropout"),
])
def test_flex_that_cannot_run_is_one_line(overrides, cuda, needle):
    with pytest.raises(ConfigError) as err:
        validate(load_config(SMOKE, overrides), world_size=1, vocab_size=257, cuda=cuda)
    assert needle in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_on_gpu_matches_dense_in_bf16_without_an_s_by_s_tensor(single_rank_parallel):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == SEQ:
                    self.square.append((str(func), tuple(t.shape)))
            return out

    results = {}
    for kind in ("dense", "flex"):
        model = _model("cuda", torch.bfloat16)
        tokens, segments, positions = _batch("cuda")
        mask = document_causal_mask(segments) if kind == "dense" else segments
        shapes = Shapes()
        with shapes:
            loss = model(tokens, positions, mask, labels=tokens).float().mean()
            loss.backward()
        results[kind] = (loss.item(), [p.grad.float() for p in model.parameters()],
                         shapes.square)
    assert results["flex"][0] == pytest.approx(results["dense"][0], rel=2e-2)
    for a, b in zip(results["flex"][1], results["dense"][1]):
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-3)
    assert results["dense"][2] and not results["flex"][2], results["flex"][2][:3]
