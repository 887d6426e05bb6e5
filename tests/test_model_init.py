"""pretrain.model.init: seeded, layout-independent parameter initialization."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.init import _seed_for, full_shape_and_slice, global_names

WIDE = ("model.hidden_size=128", "model.ffn_hidden_size=512")


def _params(chunks) -> dict[str, torch.Tensor]:
    (model,) = chunks
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_same_seed_same_parameters(smoke_config, build_model):
    a = _params(build_model(smoke_config()))
    b = _params(build_model(smoke_config()))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_different_seed_different_matrices(smoke_config, build_model):
    a = _params(build_model(smoke_config()))
    b = _params(build_model(smoke_config("train.seed=4321")))
    for name in a:
        if a[name].dim() >= 2:
            assert not torch.equal(a[name], b[name]), name
        else:  # norm gains are 1 whatever the seed
            assert torch.equal(a[name], b[name]), name


def test_parameters_match_their_named_draw(smoke_config, build_model):
    """Each matrix is N(0, std) drawn from a generator seeded by (seed, global name)."""
    cfg = smoke_config()
    (model,) = build_model(cfg)
    residual = cfg.model.init_std / math.sqrt(2 * cfg.model.num_layers)
    for name in ("decoder.layers.2.self_attention.linear_qkv.weight",
                 "decoder.layers.0.mlp.linear_fc2.weight", "embedding.word_embeddings.weight"):
        param = dict(model.named_parameters())[name]
        global_name = name.removeprefix("decoder.")
        std = residual if "linear_fc2" in name else cfg.model.init_std
        generator = torch.Generator().manual_seed(_seed_for(cfg.train.seed, global_name))
        expected = torch.empty(param.shape).normal_(0.0, std, generator=generator)
        assert torch.equal(param.detach(), expected), name


def test_layers_differ_from_each_other(smoke_config, build_model):
    params = _params(build_model(smoke_config()))
    q0 = params["decoder.layers.0.self_attention.linear_qkv.weight"]
    q1 = params["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert not torch.equal(q0, q1)


def test_norms_ones_biases_zero(smoke_config, build_model):
    cfg = smoke_config("model.normalization=layernorm", "model.bias=true", "model.activation=gelu")
    (model,) = build_model(cfg)
    norms = biases = 0
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith(".weight"):
            assert torch.equal(param, torch.ones_like(param)), name
            norms += 1
        elif name.endswith(".bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
            biases += 1
    assert norms == 2 * cfg.model.num_layers + 1
    # layernorm biases (2 per layer + final) and linear biases (4 per layer)
    assert biases == 6 * cfg.model.num_layers + 1


def test_residual_projections_use_scaled_std(smoke_config, build_model):
    cfg = smoke_config(*WIDE)
    (model,) = build_model(cfg)
    std = cfg.model.init_std
    residual = std / math.sqrt(2 * cfg.model.num_layers)
    checked = {"residual": 0, "plain": 0}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        values = param.detach().double()
        target = residual if ("linear_proj." in name or "linear_fc2." in name) else std
        assert values.std().item() == pytest.approx(target, rel=0.05), name
        assert abs(values.mean().item()) < 0.05 * target, name
        checked["residual" if target == residual else "plain"] += 1
    assert checked["residual"] == 2 * cfg.model.num_layers
    assert checked["plain"] == 2 * cfg.model.num_layers + 1  # qkv, fc1 per layer + embedding


def test_global_names(smoke_config, build_model):
    (model,) = build_model(smoke_config("model.tie_embeddings=false"))
    names = global_names(model)
    assert names["decoder.layers.3.mlp.linear_fc1.weight"] == "layers.3.mlp.linear_fc1.weight"
    assert names["decoder.final_layernorm.weight"] == "decoder.final_layernorm.weight"
    assert names["output_layer.weight"] == "output_layer.weight"  # untied: its own draw
    params = dict(model.named_parameters())
    assert not torch.equal(params["output_layer.weight"], params["embedding.word_embeddings.weight"])


# ---------------------------------------------------------------- TP slicing

def _tp_param(shape, dim) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(shape))
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


@pytest.mark.parametrize("dim", [0, 1])
def test_slices_reconstruct_the_full_tensor(dim):
    local_shape = (3, 5) if dim == 0 else (5, 3)
    full_shape = (6, 5) if dim == 0 else (5, 6)
    full = torch.arange(30, dtype=torch.float32).reshape(full_shape)
    shards = []
    for rank in range(2):
        shape, take = full_shape_and_slice(_tp_param(local_shape, dim), rank, 2, gated=True,
                                           is_fc1=False)
        assert shape == full_shape
        shard = take(full)
        assert tuple(shard.shape) == local_shape
        shards.append(shard)
    assert torch.equal(torch.cat(shards, dim=dim), full)
    assert not torch.equal(shards[0], shards[1])


def test_gated_fc1_slices_are_gate_then_up():
    # full fc1: [gate (8 rows); up (8 rows)]; each of 2 ranks holds 4 gate + 4 up rows
    full = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    gate, up = full[:8], full[8:]
    for rank in range(2):
        shape, take = full_shape_and_slice(_tp_param((8, 3), 0), rank, 2, gated=True,
                                           is_fc1=True)
        assert shape == (16, 3)
        expected = torch.cat([gate[4 * rank:4 * rank + 4], up[4 * rank:4 * rank + 4]])
        assert torch.equal(take(full), expected)


def test_ungated_fc1_is_a_plain_slice():
    full = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    _, take = full_shape_and_slice(_tp_param((8, 3), 0), 1, 2, gated=False, is_fc1=True)
    assert torch.equal(take(full), full[8:])


def test_replicated_and_single_rank_params_are_whole():
    plain = torch.nn.Parameter(torch.empty(4, 3))
    full = torch.randn(4, 3)
    shape, take = full_shape_and_slice(plain, 1, 2, gated=True, is_fc1=True)
    assert shape == (4, 3) and take(full) is full
    shape, take = full_shape_and_slice(_tp_param((4, 3), 0), 0, 1, gated=True, is_fc1=True)
    assert shape == (4, 3) and take(full) is full
