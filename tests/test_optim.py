"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.trainer.optim import build_optimizer, build_scheduler, lr_at

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


@pytest.mark.parametrize("warmup, lr", [(0, None), (10, None), (10, 0.0)])
def test_scheduler_follows_lr_at(warmup, lr):
    cfg = _cfg(warmup_steps=warmup, **({} if lr is None else {"lr": lr, "min_lr": 0.0}))
    model = _toy_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, TOTAL)
    for k in range(TOTAL + 5):
        expected = lr_at(k, cfg, TOTAL)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected, rel=1e-12), k
        optimizer.step()
        scheduler.step()


# ---------------------------------------------------------------- wsd, linear, constant

def _wsd(**kwargs) -> OptimConfig:
    return _cfg(schedule="wsd", decay_steps=20, **kwargs)


@pytest.mark.parametrize("shape, expected", [
    # step 89 is the 10th of the 20 decay steps (80..99): progress 10/20
    ("linear", 1e-4 + 9e-4 * 0.5),
    ("cosine", 1e-4 + 9e-4 * 0.5),
    ("1-sqrt", 1e-4 + 9e-4 * (1 - math.sqrt(0.5))),
])
def test_wsd_by_hand(shape, expected):
    cfg = _wsd(decay_shape=shape)
    assert lr_at(5, cfg, TOTAL) == pytest.approx(6e-4)  # warmup: 1e-3 * 6/10
    assert lr_at(10, cfg, TOTAL) == lr_at(79, cfg, TOTAL) == cfg.lr  # stable
    assert lr_at(80, cfg, TOTAL) < cfg.lr  # the decay's first step already decays
    assert lr_at(89, cfg, TOTAL) == pytest.approx(expected, rel=1e-12)
    assert lr_at(TOTAL - 1, cfg, TOTAL) == pytest.approx(cfg.min_lr)  # last step at the floor
    assert lr_at(5 * TOTAL, cfg, TOTAL) == pytest.approx(cfg.min_lr)


def test_wsd_cosine_quarter_by_hand():
    cfg = _wsd(decay_shape="cosine")
    # step 84: 5 of 20 decay steps, cos(pi/4) = sqrt(2)/2
    assert lr_at(84, cfg, TOTAL) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.sqrt(0.5)))


def test_wsd_decay_fraction():
    cfg = _cfg(schedule="wsd", decay_fraction=0.3)  # 30 of 100 steps
    assert lr_at(69, cfg, TOTAL) == cfg.lr
    assert lr_at(70, cfg, TOTAL) < cfg.lr


@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "cosine"),
                                          ("1-sqrt", "minus_sqrt")])
def test_wsd_matches_megatron_core(ours, theirs):
    """megatron-core's OptimizerParamScheduler as the oracle (no warmup: megatron's warmup
    starts from init_lr at step 0, ours at lr/warmup). Its step n is our 0-based step n-1."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = _wsd(decay_shape=ours, warmup_steps=0)
    optimizer = build_optimizer(_toy_model(), cfg)
    reference = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=0,
        lr_decay_steps=TOTAL, lr_decay_style="WSD", start_wd=0.1, end_wd=0.1, wd_incr_steps=1,
        wd_incr_style="constant", wsd_decay_steps=20, lr_wsd_decay_style=theirs)
    for step in range(TOTAL + 3):
        reference.step(1)
        assert lr_at(step, cfg, TOTAL) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                        rel=1e-12, abs=1e-15), step


def test_linear_and_constant_by_hand():
    linear = _cfg(schedule="linear")
    assert lr_at(10, linear, TOTAL) == pytest.approx(1e-3)
    assert lr_at(55, linear, TOTAL) == pytest.approx(1e-4 + 9e-4 * 0.5)  # 45 of 90 steps
    assert lr_at(TOTAL, linear, TOTAL) == pytest.approx(1e-4)
    constant = _cfg(schedule="constant")
    assert lr_at(4, constant, TOTAL) == pytest.approx(5e-4)
    assert {lr_at(s, constant, TOTAL) for s in range(10, 3 * TOTAL)} == {1e-3}


def test_restored_schedule_follows_this_config():
    """A checkpoint holds the step; the rate at the next step comes from the current config,
    so a WSD branch (train.steps shortened to stable step + decay) decays at once."""
    model = _toy_model()
    stable = _wsd()
    optimizer = build_optimizer(model, stable)
    scheduler = build_scheduler(optimizer, stable, 1000)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    assert scheduler.get_last_lr()[0] == stable.lr
    branch_opt = build_optimizer(model, stable)
    branch = build_scheduler(branch_opt, stable, 70)  # decay over steps 50..69
    branch.load_state_dict({**saved, "lr_lambdas": [None, None]})
    assert branch.get_last_lr()[0] == pytest.approx(lr_at(50, stable, 70))
    assert branch.get_last_lr()[0] < stable.lr
    same = build_scheduler(build_optimizer(model, stable), stable, 1000)
    same.load_state_dict({**saved, "lr_lambdas": [None, None]})
    assert same.get_last_lr() == scheduler.get_last_lr()  # same config: same bits


@pytest.mark.parametrize("overrides, message", [
    (["optim.decay_steps=5"], "applies to optim.schedule=wsd only"),
    (["optim.schedule=wsd", "optim.decay_steps=95"], "longer than the 90 steps after warmup"),
    (["optim.schedule=wsd", "optim.decay_fraction=1.5"], "must be in (0, 1]"),
    (["optim.schedule=wsd", "optim.decay_shape=sqrt"], "not one of linear, cosine, 1-sqrt"),
])
def test_schedule_config_errors(smoke_config, overrides, message):
    from pretrain.config import ConfigError, validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(smoke_config("train.steps=100", "optim.warmup_steps=10", *overrides))
