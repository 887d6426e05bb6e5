"""Observers of the training loop: the console line, metrics.jsonl, TensorBoard and W&B.

The loop (trainer.py) owns what must happen in order on every rank: the step, evaluation,
the stop agreement and checkpoint saves. A hook only watches: it is called on every rank
with the loop's records and decides itself whether to act (the ones here act on rank 0).
A hook that fails is switched off with one warning; watching never ends a run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import deque
from pathlib import Path

from pretrain.files import write_atomic
from pretrain.log import is_rank0, log, warn
from pretrain.run_dir import RunDir


class Hook:
    """Every method is optional. `record` is the step's metrics dict (the line written to
    metrics.jsonl); `on_step_end` sees the logged steps (train.log_interval, evaluation steps
    and the last one), after `on_eval_end` on evaluation steps."""

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_begin(self, trainer, step: int) -> None:
        """Before every step (`step`: the one about to run), on every rank."""

    def on_step_end(self, trainer, record: dict) -> None:
        pass

    def on_eval_end(self, trainer, metrics: dict) -> None:
        pass

    def on_checkpoint_loaded(self, trainer, step: int) -> None:
        pass

    def on_checkpoint_saved(self, trainer, step: int) -> None:
        """After the save call; an async save is then written in the background."""

    def on_train_end(self, trainer, reason: str) -> None:
        """`reason`: "done", "signal" (stopping to be requeued) or "error"."""

    def close(self) -> None:
        pass


class Hooks:
    """Calls each hook in order; a hook that raises is reported once and dropped."""

    def __init__(self, hooks: list[Hook]):
        self.hooks = list(hooks)

    def __getattr__(self, event: str):
        if not event.startswith(("on_", "close")):
            raise AttributeError(event)

        def dispatch(*args):
            for hook in list(self.hooks):
                try:
                    getattr(hook, event)(*args)
                except Exception as err:  # noqa: BLE001 - a watcher must not end the run
                    self.hooks.remove(hook)
                    warn(f"{type(hook).__name__} failed in {event} ({type(err).__name__}: "
                         f"{err}); it is switched off, training continues")

        return dispatch


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


class ConsoleLine(Hook):
    """One line per logged step on rank 0, with MFU when known and the time to the end
    (from the median of recent step times, which ignores the slow first steps and evals)."""

    def __init__(self, steps: int, last: int, window: int = 20):
        self.steps, self.last = steps, last
        self.step_times: deque[float] = deque(maxlen=window)

    def on_step_end(self, trainer, record: dict) -> None:
        self.step_times.append(record["step_time_s"])
        parts = [f"step {record['step']:>6}/{self.steps}", f"loss {record['loss']:.4f}",
                 f"lr {record['lr']:.3e}", f"grad_norm {record['grad_norm']:.3f}",
                 f"tokens/s {record['tokens_per_s']:,.0f}"]
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        remaining = self.last - record["step"]
        if remaining > 0:
            parts.append(f"eta {format_duration(statistics.median(self.step_times) * remaining)}")
        log(" | ".join(parts))

    def on_eval_end(self, trainer, metrics: dict) -> None:
        per_source = sorted({key.split("/", 1)[1] for key in metrics if "/" in key})
        details = "".join(
            f"; {name}: loss {metrics[f'val_loss/{name}']:.4f}"
            + (f" bpb {metrics[f'val_bpb/{name}']:.4f}" if f"val_bpb/{name}" in metrics else "")
            for name in per_source)
        bpb = f" | bits/byte {metrics['val_bpb']:.4f}" if "val_bpb" in metrics else ""
        log(f"validation | loss {metrics['val_loss']:.4f} | perplexity "
            f"{metrics['val_ppl']:,.2f}{bpb}{details}")


class MetricsWriter(Hook):
    """Appends one JSON object per logged step to RUN/metrics.jsonl (rank 0)."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).metrics
        self._file = open(self.path, "a", buffering=1) if is_rank0() else None

    def on_step_end(self, trainer, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def on_checkpoint_loaded(self, trainer, step: int) -> None:
        """Drop records past `step`: after a resume from step N the steps after N are
        trained again, and the file keeps one record per step."""
        if self._file is None:
            return
        self._file.close()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if line.strip() and json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by a kill: the steps are trained again
                continue
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def scalar_items(record: dict):
    """(tag, value) for every finite-or-not number of a record but the step: `val_*` under
    `val/`, the rest under `train/` (TensorBoard and W&B group charts by that prefix)."""
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("val_"):
            yield "val/" + key[len("val_"):], value
        else:
            yield "train/" + key, value


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range instead of an OverflowError."""
    return math.exp(loss) if loss < 700 else math.inf
