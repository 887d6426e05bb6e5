"""`logging.profile`: torch.profiler over a window of steps, as a hook (hooks.py).

On each listed rank the steps start_step .. start_step + steps - 1 are recorded, each inside a
`step N` range, then written as a Chrome trace to RUN/profile/trace_rank{R}_steps{A}-{B}.json
(chrome://tracing, ui.perfetto.dev), with the top ops by self time in the log; with `memory`
on CUDA, a memory snapshot (`.pickle`, for pytorch.org/memory_viz) beside it. Ranks not
listed pay nothing. A profiler that fails is dropped with one warning, like every hook.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pretrain.files import commit, temp_path
from pretrain.log import log
from pretrain.trainer.hooks import Hook

TOP_OPS = 12


class StepProfiler(Hook):
    def __init__(self, cfg, directory: Path):
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.memory, self.ranks, self.directory = cfg.memory, set(cfg.ranks), Path(directory)
        self.rank = None
        self.profiler = None
        self.step_range = None  # the open `step N` range

    def on_train_start(self, trainer) -> None:
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def on_step_begin(self, trainer, step: int) -> None:
        if self.rank not in self.ranks or not self.first <= step <= self.last + 1:
            return
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if step == self.first and self.profiler is None:
            self._start()
        if step == self.last + 1:
            self._finish()
        elif self.profiler is not None:
            self.step_range = torch.profiler.record_function(f"step {step}")
            self.step_range.__enter__()

    def on_train_end(self, trainer, reason: str) -> None:
        if self.profiler is not None:  # the run stopped inside the window
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
                self.step_range = None
            self._finish()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(activities=activities,
                                               profile_memory=self.memory)
        self.profiler.start()

    def _finish(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}_steps{self.first}-{self.last}"
        trace = self.directory / f"trace_{name}.json"
        temp = temp_path(trace)
        profiler.export_chrome_trace(str(temp))
        commit(temp, trace, durable=False)
        cuda = torch.cuda.is_available()
        table = profiler.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=TOP_OPS)
        log(f"profile: steps {self.first}-{self.last} on rank {self.rank} -> {trace} "
            f"(pid {os.getpid()}); top {TOP_OPS} ops by self time:\n{table}")
        if cuda and self.memory:
            snapshot = self.directory / f"memory_{name}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            log(f"profile: CUDA memory snapshot -> {snapshot} (drag it into "
                f"pytorch.org/memory_viz)")
