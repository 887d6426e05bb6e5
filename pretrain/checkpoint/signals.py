"""Stop requests from the scheduler: SIGTERM (preemption, `scancel`) and SIGUSR1 (SLURM's
`--signal=B:USR1@T` early warning). The handler only records the signal; the training loop
asks at every step boundary whether *any* rank got one (a signal may reach some ranks
only), so all ranks finish the same step, save together and exit with EXIT_REQUEUE.

A second signal while stopping is logged and ignored: the save in progress finishes. A
SIGKILL cannot be caught; the checkpoint protocol (store.py) makes it harmless.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        rank = os.environ.get("RANK", "0")
        if self.received is None:
            self.received = signum
            msg = f"rank {rank}: got {name}; stopping after this step with a checkpoint\n"
        else:
            msg = f"rank {rank}: got {name} again; already stopping, the save continues\n"
        os.write(2, msg.encode())  # async-signal-safe, unlike print

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal (a collective: call it at
        the same point on all ranks)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
