"""Experiment trackers as loop hooks: TensorBoard event files and Weights & Biases runs; and
`build_hooks`, the hooks a run's config asks for (console and JSONL from hooks.py, then these).

Both log every number of a step's record (train/* and val/* tags) on rank 0. A resumed run
continues where its checkpoint left off: TensorBoard purges the events after it, and W&B
continues the same run through the id kept in the run directory.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from pretrain.config import Config, ConfigError
from pretrain.files import write_atomic
from pretrain.trainer.hooks import ConsoleLine, Hook, Hooks, MetricsWriter, scalar_items
from pretrain.log import is_rank0, log
from pretrain.run_dir import RunDir

class TensorBoardWriter(Hook):
    """Event files under RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if not is_rank0():
            return
        from torch.utils.tensorboard import SummaryWriter

        # Steps after the checkpoint were logged by the run that died and are trained
        # again; purge_step makes TensorBoard drop the old ones, like metrics.jsonl does.
        step = trainer.state.step
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step else None)
        log(f"tensorboard: tensorboard --logdir {self.log_dir}")

    def on_step_end(self, trainer, record: dict) -> None:
        if self.writer is None:
            return
        for tag, value in scalar_items(record):
            self.writer.add_scalar(tag, value, record["step"])

    def on_train_end(self, trainer, reason: str) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None


def wandb_credentials_present() -> bool:
    """An API key where wandb looks for one: WANDB_API_KEY, or the netrc entry of its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb(cfg: Config) -> None:
    """At start-up: online W&B without an account fails now, not after the build."""
    w = cfg.logging.wandb
    if w.project and w.mode == "online" and not wandb_credentials_present():
        raise ConfigError("logging.wandb.mode=online but no Weights & Biases credentials were "
                          "found (WANDB_API_KEY or ~/.netrc); run `wandb login`, or set "
                          "logging.wandb.mode=offline and `wandb sync RUN/wandb` later")


class WandbRun(Hook):
    """One W&B run per run directory: its id is created on the first start and kept in
    RUN/wandb_run_id, so a resumed or requeued job continues the same W&B run."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run = None

    def _run_id(self) -> str:
        path = RunDir(self.run_dir).wandb_run_id
        if path.is_file():
            run_id = path.read_text().strip()
            if re.fullmatch(r"[a-z0-9]{1,64}", run_id):
                return run_id
            log(f"wandb: {path} holds no valid run id; starting a new W&B run")
        # W&B's own ids look like this (8 of [a-z0-9]); its helper moved between versions.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        write_atomic(path, run_id + "\n")
        return run_id

    def on_train_start(self, trainer) -> None:
        if not is_rank0():
            return
        import wandb

        w = self.cfg.logging.wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity or None, name=w.name or self.run_dir.name,
            mode=w.mode, dir=str(self.run_dir), id=self._run_id(), resume="allow",
            config=self.cfg.to_dict(),
            # Our console line is the log; W&B capturing stdout would wrap every print.
            settings=wandb.Settings(console="off", quiet=True))
        # Steps trained again after a resume are logged again against the same step.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        log(f"wandb: {w.mode} run {self.run.id} in {self.run.dir}")

    def on_step_end(self, trainer, record: dict) -> None:
        if self.run is not None:
            self.run.log({"step": record["step"], **dict(scalar_items(record))})

    def on_train_end(self, trainer, reason: str) -> None:
        if self.run is None:
            return
        if reason == "signal":  # stopped to be requeued: W&B shows it as preempted
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if reason == "error" else 0)
        self.run = None

    def close(self) -> None:
        self.on_train_end(None, "error")


def build_hooks(cfg, run_dir: Path) -> Hooks:
    """The hooks a run's config asks for: console and JSONL always, then the trackers."""
    t = cfg.train
    hooks: list[Hook] = [ConsoleLine(t.steps, t.exit_at_step or t.steps), MetricsWriter(run_dir)]
    if cfg.logging.tensorboard:
        hooks.append(TensorBoardWriter(RunDir(run_dir).tensorboard))
    w = cfg.logging.wandb
    if w.project and w.mode != "disabled":
        hooks.append(WandbRun(cfg, run_dir))
    if cfg.logging.profile.start_step:
        from pretrain.trainer.profile import StepProfiler

        hooks.append(StepProfiler(cfg.logging.profile, RunDir(run_dir).profile))
    return Hooks(hooks)
