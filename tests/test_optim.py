"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer, build_scheduler, lr_at

TOTAL = 100


def _cfg(**kwargs) -> OptimConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1)
    base.update(kwargs)
    return OptimConfig(**base)


def test_warmup_is_linear_from_lr_over_warmup():
    cfg = _cfg()
    assert lr_at(0, cfg, TOTAL) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps - 1, cfg, TOTAL) == pytest.approx(cfg.lr)
    for step in range(cfg.warmup_steps):
        assert lr_at(step, cfg, TOTAL) == pytest.approx(cfg.lr * (step + 1) / cfg.warmup_steps)


def test_cosine_reaches_floor_and_stays():
    cfg = _cfg()
    assert lr_at(cfg.warmup_steps, cfg, TOTAL) == pytest.approx(cfg.lr)
    assert lr_at(TOTAL, cfg, TOTAL) == pytest.approx(cfg.min_lr)
    assert lr_at(TOTAL - 1, cfg, TOTAL) > cfg.min_lr
    for step in (TOTAL + 1, TOTAL + 50, 10 * TOTAL):
        assert lr_at(step, cfg, TOTAL) == pytest.approx(cfg.min_lr)
    # halfway through the decay: the midpoint of lr and min_lr
    mid = cfg.warmup_steps + (TOTAL - cfg.warmup_steps) // 2
    assert lr_at(mid, cfg, TOTAL) == pytest.approx((cfg.lr + cfg.min_lr) / 2)


def test_cosine_shape():
    cfg = _cfg()
    step = cfg.warmup_steps + 30
    progress = 30 / (TOTAL - cfg.warmup_steps)
    expected = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    assert lr_at(step, cfg, TOTAL) == pytest.approx(expected)


def test_monotone_after_warmup():
    cfg = _cfg()
    lrs = [lr_at(s, cfg, TOTAL) for s in range(cfg.warmup_steps - 1, 2 * TOTAL)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] > lrs[-1]
    warm = [lr_at(s, cfg, TOTAL) for s in range(cfg.warmup_steps)]
    assert all(b > a for a, b in zip(warm, warm[1:]))


def test_no_warmup_starts_at_lr():
    cfg = _cfg(warmup_steps=0)
    assert lr_at(0, cfg, TOTAL) == pytest.approx(cfg.lr)
    assert lr_at(1, cfg, TOTAL) < cfg.lr
    assert lr_at(TOTAL, cfg, TOTAL) == pytest.approx(cfg.min_lr)


def _toy_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8),
                               torch.nn.LayerNorm(8), torch.nn.Linear(8, 3, bias=False))


def test_weight_decay_groups():
    model = _toy_model()
    cfg = _cfg(weight_decay=0.05)
    optimizer = build_optimizer(model, cfg)
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            decay_of[id(p)] = group["weight_decay"]
    assert len(decay_of) == len(list(model.parameters()))  # every parameter is in one group
    for name, p in model.named_parameters():
        expected = 0.0 if p.dim() == 1 else 0.05
        assert decay_of[id(p)] == expected, name
    assert sum(1 for v in decay_of.values() if v == 0.0) == 3  # linear bias, norm weight + bias
    assert all(g["lr"] == cfg.lr for g in optimizer.param_groups)
    assert optimizer.defaults["betas"] == (cfg.beta1, cfg.beta2)
    assert optimizer.defaults["eps"] == cfg.eps


def test_frozen_parameters_are_left_out():
    model = _toy_model()
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(model, _cfg())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model[0].weight) not in held
    assert len(held) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("warmup", [0, 10])
def test_scheduler_follows_lr_at(warmup):
    cfg = _cfg(warmup_steps=warmup)
    model = _toy_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, TOTAL)
    for k in range(TOTAL + 5):
        expected = lr_at(k, cfg, TOTAL)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected, rel=1e-12), k
        optimizer.step()
        scheduler.step()
