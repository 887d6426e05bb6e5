"""The small, JSON-serializable parts of a checkpoint (LR scheduler, data loader position,
counters): each is registered by name with the Checkpointer and stored under that name in
train_state.json. Tensors (model, optimizer state, RNG) are sharded by manager.py instead.
"""

from __future__ import annotations

from typing import Protocol


class Stateful(Protocol):
    """What a checkpoint part exposes; `state_dict()` must be JSON-serializable."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SchedulerState:
    """A torch LR scheduler as a checkpoint part. Its `lr_lambdas` are code (rebuilt from the
    config), not state, so they are left out; on load the optimizer groups' current LR is set
    from the restored scheduler, as its own step() would have left it."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(state["base_lrs"])})
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


def training_parts(scheduler, loader, counters) -> dict[str, Stateful]:
    """The parts every training run registers, by the names train_state.json stores them
    under ("counters" holds step, tokens and skipped updates)."""
    return {"scheduler": SchedulerState(scheduler), "loader": loader, "counters": counters}
