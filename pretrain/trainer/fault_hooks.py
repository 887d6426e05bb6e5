"""The training loop's test hooks (docs/failures.md): faults planted by environment variables,
so that tests of the real CLI can make a step's loss NaN or spike, a rank hang or straggle.
Unset (every real run), they do nothing.

    PRETRAIN_TEST_POISON=3,4   the batches of steps 3 and 4 yield a NaN loss (a NaN in the
                               loss mask: NaN gradients too)
    PRETRAIN_TEST_SPIKE=12     the labels of the global batch that step 12 reads in a run
                               without rewinds are all one id the model never saw: a finite
                               loss far above the rest (found by data position, so a rewound
                               run does not meet it again)
    PRETRAIN_TEST_HANG=5:1     rank 1 hangs at step 5
    PRETRAIN_TEST_SLOW=1:0.2   rank 1 computes (spins) 0.2 CPU-seconds longer every step
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

POISON_ENV = "PRETRAIN_TEST_POISON"
SPIKE_ENV = "PRETRAIN_TEST_SPIKE"
HANG_ENV = "PRETRAIN_TEST_HANG"
SLOW_ENV = "PRETRAIN_TEST_SLOW"


def _steps(name: str) -> frozenset[int]:
    return frozenset(int(s) for s in os.environ.get(name, "").split(",") if s)


def _pair(name: str, kind) -> tuple[int, object] | None:
    value = os.environ.get(name, "")
    return (int(value.split(":")[0]), kind(value.split(":")[1])) if value else None


@dataclass(frozen=True)
class FaultHooks:
    poison: frozenset = frozenset()
    spike: frozenset = frozenset()
    hang: tuple | None = None  # (step, rank)
    slow: tuple | None = None  # (rank, CPU seconds)

    @classmethod
    def from_env(cls) -> "FaultHooks":
        return cls(_steps(POISON_ENV), _steps(SPIKE_ENV), _pair(HANG_ENV, int),
                   _pair(SLOW_ENV, float))

    def corrupt(self, micro_batches: list, step: int, batch_index: int, vocab: int) -> None:
        """Before step `step` (which reads global batch `batch_index`) is computed."""
        if step in self.poison:
            micro_batches[0].loss_mask[0, 0] = float("nan")
        if batch_index + 1 in self.spike:
            for micro in micro_batches:  # every label the last id: one the model never saw
                micro.labels.fill_(vocab - 1)
        if self.hang and self.hang[0] == step and self.hang[1] == torch.distributed.get_rank():
            time.sleep(1e6)

    def spin(self) -> None:
        """The straggler: CPU seconds (whatever else the machine runs), counted as compute."""
        if self.slow and self.slow[0] == torch.distributed.get_rank():
            until = time.process_time() + self.slow[1]
            while time.process_time() < until:
                pass
