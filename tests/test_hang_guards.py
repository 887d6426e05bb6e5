"""Hangs that outlive a crash, injected for real: a stale lock of a killed DeepSpeed JIT build
(every later CPU run used to wait on it forever), and the processes a SIGKILLed trainer or
its async checkpoint writer leave behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.launch_helpers import leftover_processes, run_training, start_ranks

pytestmark = pytest.mark.slow


def test_stale_extension_lock_is_not_waited_on(tmp_path):
    """The lock torch's JIT build leaves when killed mid-build: with it present, a CPU run
    must still train (DeepSpeed's CPU shm comm op is never built)."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").write_text("")
    out = run_training(tmp_path / "run", ["train.steps=2"], timeout=150,
                       env_extra={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert "built successfully" not in out.stdout
    assert (extensions / "deepspeed_shm_comm" / "lock").exists()


def test_sigkill_during_async_save_leaves_no_process(tmp_path):
    """Two guards stand behind this (each alone suffices, checked by hand): the results-queue
    server dies with the trainer (megatron_compat._die_with_parent), and pretrain.reaper kills every
    descendant. With both removed, the queue server was still alive 15 s after the kill."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    procs = start_ranks(run_dir, ["train.steps=400", "checkpoint.interval=1",
                                  "checkpoint.async_save=on", "checkpoint.keep_last=1"],
                        1, logs)
    trainer = procs[0]
    try:
        deadline = time.monotonic() + 240
        log = logs / "rank0.log"
        # Kill while a save is in flight: right after the second hand-off to a writer.
        while log.read_text().count("handed to a background writer") < 2:
            assert trainer.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no async save started"
            time.sleep(0.05)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        assert leftover_processes(trainer.pid) == []
    finally:
        try:
            os.killpg(trainer.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
