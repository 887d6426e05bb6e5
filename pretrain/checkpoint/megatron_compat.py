"""What the checkpointer needs from megatron-core's dist_checkpointing beyond its plain API:
a results queue that starts in milliseconds and dies with its parent, the fully parallel save
strategy, and the queue of background (forked) writers for asynchronous saves.

Kept apart from the manager because each piece works around or reaches into megatron's
internals (`filesystem_async._results_queue`): on a megatron-core upgrade, this is the file
to check.
"""

from __future__ import annotations

import os
import signal

from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper)


def _die_with_parent() -> None:
    """Runs in the Manager's server process: SIGKILL it when the training process dies.
    Otherwise a killed rank leaves the server running, holding the job's stdout/stderr open
    (a launcher waiting for EOF then waits forever). Stop signals are ignored: SLURM sends
    them to every process of a task, and the server must outlive the checkpoint they ask for."""
    import ctypes

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the server outlives a SIGKILLed parent
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def start_results_queue() -> None:
    """megatron's torch_dist writer collects results from its forked writer processes through
    a multiprocessing Manager queue that it starts, on first use, in the *spawn* context: a
    fresh interpreter that re-imports the training script (about 3 s per rank, on the first
    save of every process). A Manager started by fork serves the same proxies (picklable to
    forked and spawned processes alike) in milliseconds."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        import multiprocessing
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_die_with_parent)
        filesystem_async._results_queue = manager.Queue()


def save_strategy():
    """Replicated tensors (every DP rank holds the same weights) are written once, the
    writing spread evenly over the DP group."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                            ps.get_data_parallel_group())


def async_writers():
    """The queue of background saves: a forked writer per save, which sees the tensors as
    they were at the fork (copies in host memory on GPU), so training may change them at once."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)
