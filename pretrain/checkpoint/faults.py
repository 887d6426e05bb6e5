"""The kill points of a save, for tests only (documented in docs/checkpoints.md, used by
tests/checkpoint/test_faults.py): an environment variable stops a real save at exact places.

PRETRAIN_TEST_FAULT="ACTION:POINT:STEP[:RANK]" makes the given rank (all ranks when omitted)
SIGKILL itself ("kill"), send itself SIGTERM ("signal") or stop for good, as a stuck writer
would ("hang"), at POINT of the save of STEP ("*": any step).
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

FAULT_ENV = "PRETRAIN_TEST_FAULT"
FAULT_POINTS = ("begin", "files_written", "record_written", "renamed", "latest_written")


def fault(point: str, step: int) -> None:
    """Act when PRETRAIN_TEST_FAULT names this point of this step's save on this rank."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    action, where, at = parts[0], parts[1], parts[2]
    if where != point or at not in ("*", str(step)):
        return
    if len(parts) > 3 and int(parts[3]) != dist.get_rank():
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "hang":
        os.write(2, f"test fault: the save of step {step} hangs at {point}\n".encode())
        while True:  # a signal handler runs and returns here: only the save deadline ends it
            time.sleep(60)
