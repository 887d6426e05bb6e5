"""A save that cannot finish (a writer SIGKILLed by the OOM killer left the trainer in
megatron's `count_queue.join()` for good; the hang watchdog is paused during saves and SIGTERM
only says "stop after this step") is abandoned after `checkpoint.save_timeout_s`: one line,
every thread's stack, exit 76 (requeued like a hang), and nothing half-written is published.
The stuck save is made by the test fault `hang` (pretrain/checkpoint/faults.py): the save of
step 4 stops for good after its tensor files are written."""

from __future__ import annotations

import signal
import time

import pytest

from pretrain.checkpoint.store import CheckpointDir
from pretrain.errors import EXIT_HUNG
from tests.launch_helpers import run_training, start_ranks, wait_all

pytestmark = pytest.mark.slow

BASE = ["train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2",
        "checkpoint.interval=2", "train.sample_tokens=0", "checkpoint.save_timeout_s=3"]
HANG = {"PRETRAIN_TEST_FAULT": "hang:files_written:4"}


def test_a_save_that_hangs_is_abandoned_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    out = run_training(run_dir, BASE, env_extra=HANG, expect_rc=EXIT_HUNG, timeout=120)
    err = out.stderr
    assert ("rank 0: watchdog: the save of step 4 has run 3 s, over checkpoint.save_timeout_s=3;"
            " abandoning it") in err or "the save of step 4 has run 4 s" in err, err[-3000:]
    assert "in fault" in err  # the stack shows where the save was stuck
    ckpt = CheckpointDir(run_dir / "checkpoints")
    assert ckpt.latest_pointer() == "step_00000002"
    assert [c.step for c in ckpt.candidates()] == [2]  # step 4's files stay in staging
    assert time.monotonic() - started < 90
    resumed = run_training(run_dir, BASE)  # the requeue
    assert f"resumed from {ckpt.root / 'step_00000002'} at step 2" in resumed.stdout
    assert [c.step for c in ckpt.candidates()] == [6, 4]
    assert not [p.name for p in ckpt.root.iterdir() if ".tmp-" in p.name]


def test_sigterm_during_a_stuck_save_ends_within_the_deadline(tmp_path):
    """The stop signal is recorded, the save still hangs: the deadline, not an endless wait,
    ends the process."""
    log_dir = tmp_path / "logs"
    (proc,) = start_ranks(tmp_path / "run", BASE + ["checkpoint.save_timeout_s=6"], 1, log_dir,
                          env_extra=HANG)
    log = log_dir / "rank0.log"
    deadline = time.monotonic() + 90
    while "test fault: the save of step 4 hangs" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert wait_all([proc], timeout=60) == [EXIT_HUNG], log.read_text()[-3000:]
    assert time.monotonic() - signalled < 6 + 5
    assert "over checkpoint.save_timeout_s=6" in log.read_text()
