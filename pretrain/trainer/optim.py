"""AdamW parameter groups and the learning-rate schedules: linear warmup, then cosine, linear
or constant, or warmup-stable-decay (WSD) whose final decay can branch off any stable step.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import OptimConfig


def decay_coefficient(shape: str, progress: float) -> float:
    """1 at the start of a decay (progress 0), 0 at its end (progress 1)."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # 1-sqrt: Hägele et al. (2024) found it matches a full cosine run at a short decay.
    return 1.0 - math.sqrt(progress)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # Stable at lr until the last `length` steps; the last step runs at min_lr. Only
        # total_steps places the decay, so a branch (load_from a stable-phase checkpoint at
        # step S, train.steps = S + length) decays from exactly S.
        length = cfg.wsd_decay_length(total_steps)
        start = total_steps - length
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / length)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay_coefficient(cfg.decay_shape, progress)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = "linear" if cfg.schedule == "linear" else "cosine"
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay_coefficient(shape, progress)


def build_optimizer(modules: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Norm gains, biases and other vectors are not decayed (GPT-2 / megatron practice).
    decay, no_decay = [], []
    for param in modules.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=False)


class ConfigSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose restored state keeps only the step: the rate itself is recomputed from
    this run's config, so a WSD branch (or a changed optim.lr) applies from the first resumed
    step instead of replaying the saved run's last rate. Same config: the same bits."""

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        self._last_lr = [base * rate(self.last_epoch)
                         for base, rate in zip(base_lrs, self.lr_lambdas)]


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> ConfigSchedule:
    # Not megatron's OptimizerParamScheduler: checkpoints store a LambdaLR state (the step).
    # tests/test_optim.py checks these shapes against megatron's formulas.
    # optim.lr=0 (a frozen run, e.g. to measure or to check a resume) is a factor of 0, not 0/0.
    return ConfigSchedule(optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr
                          if cfg.lr else 0.0)
