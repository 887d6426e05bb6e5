"""What the Checkpointer saves and restores: a registry of named parts of two kinds.

- JSON parts (`Stateful`: the LR scheduler, the data loader position, the counters) expose
  `state_dict()`/`load_state_dict()` and are stored under their names in train_state.json.
- Tensor parts (`TensorPart`: model chunks, ZeRO optimizer state, RNG; tensor_parts.py)
  expose `sharded_state_dict()`/`load_sharded_state_dict()`: megatron-core sharded tensors,
  written by dist_checkpointing under global keys, so they reshard on load.

A new kind of state is one more part registered by the caller; the manager is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Stateful(Protocol):
    """What a JSON checkpoint part exposes; `state_dict()` must be JSON-serializable."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Loading:
    """The checkpoint a load reads, as tensor parts need to know it."""

    state: dict  # its train_state.json
    same_layout: bool  # saved under this run's TP/PP/DP layout (per-rank state applies)
    weights_only: bool  # checkpoint.weights_only: only the model part is loaded

    @property
    def step(self) -> int:
        return self.state["step"]


class TensorPart:
    """A part held as megatron-core sharded tensors (nested dicts of ShardedTensor).

    Saving: `sharded_state_dict(host=...)`, the tensors to write; `host(key, tensor)`, when
    given (asynchronous saves), copies a tensor into a reused host buffer, for parts that
    stage their own tensors (whatever is not staged so is copied by the manager afterwards).
    Loading: `sharded_state_dict(loading)` is the template megatron-core reads into (an empty
    dict: nothing to read), then `load_sharded_state_dict(loaded, loading)` installs it."""

    def sharded_state_dict(self, loading: Loading | None = None, host=None) -> dict:
        raise NotImplementedError

    def load_sharded_state_dict(self, state: dict, loading: Loading) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Fields this part adds to the top level of train_state.json (for readers and for
        loads that need them before the tensors are read)."""
        return {}


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
    """The JSON parts every training run registers, by the names train_state.json stores them
    under ("counters" holds step, tokens and skipped updates)."""
    return {"scheduler": SchedulerState(scheduler), "loader": loader, "counters": counters}
