"""Crashes during a save, corrupt checkpoints and stop signals, on real training processes.

Kills are real SIGKILLs delivered at exact points of the save protocol through the
PRETRAIN_TEST_FAULT hook (pretrain/checkpoint/faults.py). After every kill, `latest` must
name a complete checkpoint, and a restart must resume from the newest complete one and
finish with the uninterrupted run's losses, bit for bit.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from pretrain.checkpoint import store
from pretrain.errors import EXIT_REQUEUE
from pretrain.checkpoint.store import CheckpointDir
from tests.checkpoint.crafted import RunsCode, plant_bytes_entry, rerecord
from tests.launch_helpers import read_metrics, run_training, start_ranks, wait_all

# Every test here starts the training CLI (some over several ranks): the full lane only.
pytestmark = pytest.mark.slow

BASE = ["train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.warmup_steps=1", "checkpoint.interval=2", "checkpoint.keep_last=2"]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def _complete(path) -> bool:
    try:
        record = store.read_record(path)
        store.check_sizes(path, record)
        store.check_digests(path, record, sorted(record["files"]))
        return True
    except store.CheckpointError:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_training(run_dir, BASE)
    return run_dir


# point of the save of step 4 -> the checkpoint a restart must resume from
KILL_POINTS = {
    "begin": 2,            # nothing of step 4 written yet
    "files_written": 2,    # tensors written to the staging directory, no record
    "record_written": 2,   # complete staging directory, not yet renamed
    "renamed": 4,          # step_00000004 published, latest still says step 2
    "latest_written": 4,   # latest updated, retention not yet run
}


@pytest.mark.parametrize("point, mode", [(p, "sync") for p in KILL_POINTS] + [
    ("files_written", "async"), ("renamed", "async")])
def test_kill_during_save(tmp_path, reference, point, mode):
    run_dir = tmp_path / "run"
    killed = run_training(run_dir, BASE + [f"checkpoint.async_save={mode == 'async'}"],
                          expect_rc=-signal.SIGKILL,
                          env_extra={"PRETRAIN_TEST_FAULT": f"kill:{point}:4"})
    ckpt = CheckpointDir(run_dir / "checkpoints")
    latest = ckpt.latest_pointer()
    assert latest in ("step_00000002", "step_00000004"), killed.stdout
    assert _complete(ckpt.root / latest), f"latest -> {latest} is not complete"
    resume_from = KILL_POINTS[point]
    out = run_training(run_dir, BASE)
    assert f"resumed from {ckpt.root / f'step_{resume_from:08d}'} at step {resume_from}" in out.stdout
    assert _losses(run_dir) == _losses(reference)
    assert ckpt.latest_pointer() == "step_00000006"
    assert not [p.name for p in ckpt.root.iterdir() if ".tmp-" in p.name or ".trash" in p.name]
    assert [c.step for c in ckpt.candidates()] == [6, 4]


def test_kill_one_rank_during_save(tmp_path, reference):
    """Rank 1 dies after writing its files; torchrun tears rank 0 down. Nothing of step 4 is
    published and the restart resumes from step 2 under the same two ranks."""
    run_dir = tmp_path / "run"
    run_training(run_dir, BASE + ["parallel.zero_stage=2"], nproc=2, expect_rc=None,
                 env_extra={"PRETRAIN_TEST_FAULT": "kill:files_written:4:1"})
    ckpt = CheckpointDir(run_dir / "checkpoints")
    assert ckpt.latest_pointer() == "step_00000002"
    assert [c.step for c in ckpt.candidates()] == [2]
    out = run_training(run_dir, BASE + ["parallel.zero_stage=2"], nproc=2)
    assert "at step 2 (same layout)" in out.stdout
    got, want = dict(_losses(run_dir)), dict(_losses(reference))
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "flip", "crafted_index", "bytes_entry"])
def test_corrupt_newest_falls_back(tmp_path, reference, damage):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_training(run_dir, BASE + ["train.exit_at_step=4"])
    newest = run_dir / "checkpoints" / "step_00000004"
    target = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "crafted_index":  # code in the DCP index itself, with a matching record
        import pickle

        (newest / ".metadata").write_bytes(pickle.dumps({"x": RunsCode(f"touch {marker}")}))
        rerecord(newest, [".metadata"])
    else:  # a plain-looking index whose embedding entry makes DCP unpickle a payload
        plant_bytes_entry(newest, f"touch {marker}")
    out = run_training(run_dir, BASE)
    assert not marker.exists(), "the crafted checkpoint ran code"
    reason = {"truncate": "truncated", "flip": "sha256 differs",
              "crafted_index": "refers to posix.system",
              "bytes_entry": "BytesStorageMetadata"}[damage]
    assert f"skipping {newest}" in out.stderr and reason in out.stderr, out.stderr[-2000:]
    assert "at step 2 (same layout)" in out.stdout
    assert _losses(run_dir) == _losses(reference)


def _flip_largest(ckpt_dir) -> None:
    target = max((p for p in ckpt_dir.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def test_corrupt_newest_with_keep_last_1_never_costs_the_good_ones(tmp_path):
    """step 4 corrupt, step 2 good, keep_last=1: the resumed run saves step 3; retention must
    keep step 3 (just saved, the one intact checkpoint it counts) and leave the corrupt step 4
    (formerly it kept step 4 and deleted 3 and 2, and the next start began at step 0)."""
    run_dir = tmp_path / "run"
    run_training(run_dir, BASE + ["train.exit_at_step=4"])
    ckpt = CheckpointDir(run_dir / "checkpoints")
    _flip_largest(ckpt.root / "step_00000004")
    out = run_training(run_dir, BASE + ["checkpoint.keep_last=1", "checkpoint.interval=1",
                                        "train.exit_at_step=3"])
    assert "at step 2 (same layout)" in out.stdout
    assert "does not count it" in out.stderr and "step_00000004" in out.stderr, out.stderr[-2000:]
    assert [c.step for c in ckpt.candidates()] == [4, 3]
    assert _complete(ckpt.root / "step_00000003")
    out = run_training(run_dir, BASE + ["checkpoint.keep_last=1", "train.exit_at_step=4"])
    assert "at step 3 (same layout)" in out.stdout


def test_every_checkpoint_corrupt_stops_with_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, BASE + ["train.exit_at_step=2"])
    _flip_largest(run_dir / "checkpoints" / "step_00000002")
    steps_before = [r["step"] for r in read_metrics(run_dir)]
    out = run_training(run_dir, BASE, expect_rc=2)
    assert "checkpoint error: every checkpoint in" in out.stderr
    assert "step_00000002: " in out.stderr and "sha256 differs" in out.stderr
    assert "Traceback" not in out.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == steps_before  # nothing retrained


def _wait_for_step(run_dir, step, procs, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited before the signal was sent")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_signal_to_one_rank_stops_all_with_a_checkpoint(tmp_path):
    """SIGUSR1 reaches rank 1 only (as a signal may on a real cluster): both ranks finish the
    same step, save together and exit EXIT_REQUEUE; a restart continues from there."""
    run_dir = tmp_path / "run"
    long = ["train.steps=400", "train.global_batch_size=8", "train.micro_batch_size=2",
            "optim.warmup_steps=1", "checkpoint.interval=0"]
    procs = start_ranks(run_dir, long, 2, tmp_path / "logs")
    _wait_for_step(run_dir, 2, procs)
    procs[1].send_signal(signal.SIGUSR1)
    codes = wait_all(procs, 240)
    logs = "".join((tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], logs[-3000:]
    stopped = read_metrics(run_dir)[-1]["step"]
    assert 2 <= stopped < 400
    ckpt = CheckpointDir(run_dir / "checkpoints")
    assert ckpt.latest_pointer() == f"step_{stopped:08d}"
    assert _complete(ckpt.root / f"step_{stopped:08d}")
    assert "rank 1: got SIGUSR1" in logs and "rank 0: got" not in logs
    out = run_training(run_dir, long + [f"train.exit_at_step={stopped + 1}"], nproc=2)
    assert f"at step {stopped} (same layout)" in out.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 2))


def test_second_signal_during_the_save_is_ignored(tmp_path):
    """SIGTERM, then SIGTERM again while the stop checkpoint is being written (delivered by
    the fault hook after the tensors are on disk): the save completes, exit EXIT_REQUEUE."""
    run_dir = tmp_path / "run"
    long = ["train.steps=400", "checkpoint.interval=0"]
    procs = start_ranks(run_dir, long, 1, tmp_path / "logs",
                        env_extra={"PRETRAIN_TEST_FAULT": "signal:files_written:*"})
    _wait_for_step(run_dir, 1, procs)
    procs[0].send_signal(signal.SIGTERM)
    codes = wait_all(procs, 240)
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert codes == [EXIT_REQUEUE], log[-3000:]
    assert "got SIGTERM again; already stopping" in log
    ckpt = CheckpointDir(run_dir / "checkpoints")
    assert _complete(ckpt.root / ckpt.latest_pointer())
