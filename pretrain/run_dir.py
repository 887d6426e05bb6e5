"""The one owner of a run directory's file names (`run.dir`; DESIGN.md "Run directory"):

    RUN/config.yaml                 the resolved config (the run's identity on resume)
    RUN/metrics.jsonl               one JSON object per logged step
    RUN/tensorboard/                event files (logging.tensorboard)
    RUN/profile/                    profiler traces (logging.profile)
    RUN/wandb_run_id                the W&B run a resumed job continues
    RUN/checkpoints/step_00000100/  one complete checkpoint (its train_state.json inside)
    RUN/checkpoints/latest          the newest complete checkpoint's name

Everything else that needs one of these paths asks a `RunDir` (or takes the names below);
what lies inside a checkpoint besides train_state.json is the checkpoint format's
(checkpoint/store.py).
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
WANDB_RUN_ID = "wandb_run_id"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
STEP_RE = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class RunDir:
    """Paths of one run directory; nothing is created here."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def profile(self) -> Path:
        return self.root / PROFILE

    @property
    def wandb_run_id(self) -> Path:
        return self.root / WANDB_RUN_ID

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"
