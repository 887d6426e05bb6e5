"""Guards of the training loop: non-finite steps skipped and counted (the run stops with
exit 2 after too many in a row), loss spikes flagged (and their updates skipped or rewound),
stragglers named, and a watchdog for hung steps.

Every rank reaches the same decisions from the same global numbers (the all-reduced loss,
DeepSpeed's global gradient norm), so the collectives that follow stay in step.
"""

from __future__ import annotations

import faulthandler
import math
import os
import socket
import statistics
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager

# A hung step ends the process with EXIT_HUNG: a crash to slurm/pretrain_1b.sh, which
# requeues it (up to MAX_RESTARTS) to resume from the newest checkpoint.
from pretrain.errors import EXIT_HUNG, TrainingHalted
from pretrain.log import warn


class NonFiniteGuard:
    """Counts steps whose update was skipped because the loss or the gradient norm was not
    finite; after `limit` in a row the run stops instead of burning its allocation."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def observe(self, loss: float, grad_norm: float, applied: bool) -> bool:
        """True when this step was bad (its update skipped, or a number not finite)."""
        bad = not applied or not math.isfinite(loss) or not math.isfinite(grad_norm)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        return bad

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise TrainingHalted once `limit` bad steps came in a row."""
        if self.in_a_row >= self.limit:
            raise TrainingHalted(
                f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient norm (last: loss {loss}, grad_norm {grad_norm}); their updates were "
                f"skipped. Stopping without requeue: resume from the last checkpoint with a "
                f"lower optim.lr, or check the data of these steps (train.max_bad_steps="
                f"{self.limit})")


class LossSpikes:
    """Flags a loss more than `zscore` standard deviations above the mean of the previous
    `window` finite losses (0 turns it off). `score` watches and keeps every loss; the loop
    calls `check` and `add` apart when a spike's update is dropped (train.loss_spike_action
    skip or rewind), so that the spike does not enter the window. `losses` may be a list
    kept elsewhere (the checkpointed counters), so a resumed run judges as the first did."""

    def __init__(self, zscore: float, window: int, losses: list | None = None):
        self.zscore, self.window = zscore, window
        self.losses: list[float] = [] if losses is None else losses

    def check(self, loss: float) -> float | None:
        """The loss's z-score when it is a spike, else None; the window is unchanged."""
        if not self.zscore or not math.isfinite(loss):
            return None
        recent = self.losses[-self.window:]
        if len(recent) >= max(10, self.window // 4):
            mean = statistics.fmean(recent)
            spread = statistics.pstdev(recent, mean) or 1e-12
            z = (loss - mean) / spread
            return z if z > self.zscore else None
        return None

    def add(self, loss: float) -> None:
        if self.zscore and math.isfinite(loss):
            self.losses.append(loss)
            del self.losses[:-self.window]  # in place: the list may be shared

    def score(self, loss: float) -> float | None:
        """check, then add: the loss enters the window, spike or not."""
        spike = self.check(loss)
        self.add(loss)
        return spike


class Stragglers:
    """Names ranks whose compute time is over `factor` x the median rank's for `steps`
    observations in a row (factor 0: off). Every rank sees the same all-gathered times, so
    every rank reaches the same verdict; rank 0 logs it."""

    def __init__(self, factor: float, steps: int, world_size: int):
        self.factor, self.steps = factor, steps
        self.in_a_row = [0] * world_size

    hosts: list | None = None  # every rank's host name, gathered at the first check

    def check(self, busy_s: float, step: int, record: dict, device) -> None:
        """Every rank's compute seconds since the last check (`busy_s` is this rank's), in one
        small all-gather; a rank over factor x the median for `steps` checks in a row is named
        (in the log once per `steps` checks, in the record each time)."""
        import torch

        world = len(self.in_a_row)
        if self.hosts is None:
            self.hosts = [None] * world
            torch.distributed.all_gather_object(self.hosts, socket.gethostname())
        mine = torch.tensor([busy_s], dtype=torch.float64, device=device)
        times = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(times, mine)
        seconds = [float(x) for x in times]
        slow, median = self.observe(seconds)
        record["compute_s_median"] = median
        if not slow:
            return
        record["stragglers"] = [{"rank": r, "host": self.hosts[r], "compute_s": seconds[r],
                                 "median_s": median} for r in slow]
        for r in slow:
            if self.in_a_row[r] % self.steps == 0:
                warn(f"step {step}: straggler: rank {r} on {self.hosts[r]} computed "
                     f"{seconds[r]:.3f} s, {seconds[r] / max(median, 1e-9):.1f}x the median rank's "
                     f"{median:.3f} s, for {self.in_a_row[r]} logged steps in a row "
                     f"(train.straggler_factor={self.factor:g}, "
                     f"train.straggler_steps={self.steps})")

    def observe(self, seconds: list[float]) -> tuple[list[int], float]:
        """The ranks slow for `steps` observations in a row or more, and the median."""
        median = statistics.median(seconds)
        for rank, time_s in enumerate(seconds):
            slow = self.factor > 0 and time_s > self.factor * median
            self.in_a_row[rank] = self.in_a_row[rank] + 1 if slow else 0
        return [r for r, n in enumerate(self.in_a_row) if n >= self.steps], median


EXIT_GRACE_S = 3.0  # seconds a firing watchdog waits before exiting: every rank dumps


class Watchdog:
    """A thread that expects `beat()` once per step. When a step takes longer than
    max(min_seconds, factor x the median of recent steps), it writes every thread's Python
    stack to stderr and ends the process with EXIT_HUNG. Every rank runs one: a rank stuck
    in a collective waiting for a rank stuck elsewhere fires too, so each rank's log shows
    where it was. `paused()` covers work that is not a step (evaluation, saves)."""

    def __init__(self, factor: float, min_seconds: float, rank: int, window: int = 20):
        self.factor, self.min_seconds, self.rank = factor, min_seconds, rank
        self.step_times: deque[float] = deque(maxlen=window)
        self._last = time.monotonic()
        self._paused = False
        self._step = 0
        # (seconds, what, the config key) while a deadline() is on: it replaces the step budget
        self._deadline: tuple[float, str, str] | None = None
        self._stop = threading.Event()
        self._thread = None
        if factor > 0:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def budget(self) -> float:
        if not self.step_times:
            return self.min_seconds
        return max(self.min_seconds, self.factor * statistics.median(self.step_times))

    def beat(self, step: int, step_seconds: float | None = None) -> None:
        if step_seconds is not None:
            self.step_times.append(step_seconds)
        self._step = step
        self._last = time.monotonic()
        self._paused = False

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._last = time.monotonic()
            self._paused = False

    @contextmanager
    def deadline(self, seconds: float, what: str, key: str):
        """Work that is not a step but must not hang either (a checkpoint save): over SECONDS
        it is abandoned like a hung step, the message naming WHAT and the config KEY. Runs
        even when the step watchdog is off (train.watchdog_factor=0)."""
        self._deadline = (seconds, what, key)
        self._last = time.monotonic()
        self._start()
        try:
            yield
        finally:
            self._deadline = None
            self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.min_seconds / 4)):
            waited = time.monotonic() - self._last
            deadline = self._deadline
            if deadline is not None:
                seconds, what, key = deadline
                if waited <= seconds:
                    continue
                message = (f"rank {self.rank}: watchdog: {what} has run {waited:.0f} s, over "
                           f"{key}={seconds:g}; abandoning it (a checkpoint is only ever published whole). "
                           f"Python stacks of every thread follow, then exit {EXIT_HUNG}\n")
            elif self._paused or self.factor <= 0 or waited <= self.budget():
                continue
            else:
                message = (f"rank {self.rank}: watchdog: step {self._step + 1} has run "
                           f"{waited:.0f} s, over its budget of {self.budget():.0f} s "
                           f"(train.watchdog_factor={self.factor:g} x the median step, at least "
                           f"train.watchdog_min_s={self.min_seconds:g}); Python stacks of every "
                           f"thread follow, then exit {EXIT_HUNG}\n")
            os.write(2, message.encode() + self._stacks())
            # The other ranks' watchdogs fire within a poll interval of this one; exiting at
            # once let the launcher kill them first, so the log missed where they were.
            time.sleep(EXIT_GRACE_S)
            os._exit(EXIT_HUNG)

    def _stacks(self) -> bytes:
        """Every thread's Python stack, each line prefixed with this rank, as one buffer:
        written with one call, the ranks' dumps into a shared stderr (torchrun's) do not
        interleave mid-line as faulthandler's many small writes do."""
        with tempfile.TemporaryFile() as dump:
            faulthandler.dump_traceback(file=dump, all_threads=True)
            dump.seek(0)
            lines = dump.read().decode(errors="replace").splitlines()
        return "".join(f"rank {self.rank}: {line}\n" for line in lines).encode()

    def close(self) -> None:
        self._stop.set()
