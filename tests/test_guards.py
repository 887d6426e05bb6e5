"""The loop's guards with real faults: a poisoned batch (NaN loss and gradients) is skipped
under DeepSpeed ZeRO-0 and ZeRO-1; too many in a row stop the run with exit 2 and one line;
a rank that hangs makes every rank's watchdog dump its Python stacks and exit 76; a planted
loss spike is skipped (ZeRO-3, DP=2 ZeRO-1) or rewound past; a slow rank is named."""

from __future__ import annotations

import json
import math
import socket

import pytest

from pretrain.config import ConfigError, load_config, validate
from pretrain.errors import EXIT_HUNG
from pretrain.trainer.guards import LossSpikes, NonFiniteGuard, Watchdog
from tests.launch_helpers import REPO, read_metrics, run_training

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_poisoned_batch_is_skipped_and_training_continues(tmp_path, zero_stage):
    run = tmp_path / "run"
    proc = run_training(run, [f"parallel.zero_stage={zero_stage}", "train.steps=6"],
                        env_extra={"PRETRAIN_TEST_POISON": "3"})
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(metrics[2]["loss"]) and not math.isfinite(metrics[2]["grad_norm"])
    # Had the NaN gradients reached the weights, every later loss would be NaN too.
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(metrics) if i != 2)
    assert [m["skipped_updates"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert metrics[3]["lr"] == metrics[2]["lr"]  # the LR schedule waits for the skipped update
    assert "step 3: loss nan, grad_norm inf: update skipped (1 in a row" in proc.stderr


def test_bad_steps_in_a_row_stop_the_run_with_exit_2(tmp_path):
    run = tmp_path / "run"
    proc = run_training(run, ["train.steps=8", "checkpoint.interval=2", "train.max_bad_steps=3"],
                        env_extra={"PRETRAIN_TEST_POISON": "3,4,5"}, expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning:")
              and "OVERFLOW" not in line]
    assert errors == [
        "training error: 3 steps in a row (up to step 5) had a non-finite loss or gradient norm "
        "(last: loss nan, grad_norm inf); their updates were skipped. Stopping without requeue: "
        "resume from the last checkpoint with a lower optim.lr, or check the data of these steps "
        "(train.max_bad_steps=3)"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_a_hung_rank_is_found_by_every_rank_watchdog(tmp_path):
    proc = run_training(tmp_path / "run", ["train.steps=6", "train.watchdog_min_s=3",
                                           "train.watchdog_factor=5"], nproc=2,
                        env_extra={"PRETRAIN_TEST_HANG": "3:1"}, expect_rc=None, timeout=120,
                        torchrun=True)  # torchrun's teardown of the others is part of the case
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank}: watchdog: step 3 has run" in out
    lines = out.splitlines()
    # rank 1's stack: where it hangs (fault_hooks.py); each rank's dump is whole lines
    assert any(line.startswith("rank 1: ") and "in corrupt" in line for line in lines)
    # rank 0's stack: the collective waiting for rank 1
    assert any(line.startswith("rank 0: ") and "in all_reduce" in line for line in lines)
    assert f"exitcode: {EXIT_HUNG}" in out


SPIKE = ["train.loss_spike_zscore=3", "train.loss_spike_window=12"]


@pytest.mark.parametrize("nproc,zero_stage", [(1, 3), (2, 1)])
def test_a_loss_spike_update_is_skipped_like_an_overflow(tmp_path, nproc, zero_stage):
    """Step 12's batch makes a finite spike (PRETRAIN_TEST_SPIKE=12); with action=skip its
    update is dropped. The reference drops the same step's update through DeepSpeed's own
    overflow skip (a NaN batch): the losses and LRs after it must be the same bits, so the
    weights, the Adam state and the LR schedule saw nothing of step 12 in either run."""
    common = [f"parallel.zero_stage={zero_stage}", "train.steps=14",
              "checkpoint.save_on_stop=false", "train.loss_spike_action=skip", *SPIKE]
    spiked = run_training(tmp_path / "spike", common, nproc=nproc,
                          env_extra={"PRETRAIN_TEST_SPIKE": "12"})
    run_training(tmp_path / "nan", common, nproc=nproc, env_extra={"PRETRAIN_TEST_POISON": "12"})
    got, want = read_metrics(tmp_path / "spike"), read_metrics(tmp_path / "nan")
    assert [m["step"] for m in got] == list(range(1, 15))
    assert got[11]["loss"] > got[10]["loss"] + 1 and got[11]["loss_spike_z"] > 3
    assert [(m["loss"], m["lr"]) for m in got[12:]] == [(m["loss"], m["lr"]) for m in want[12:]]
    # a skipped spike is not a non-finite step, and stays out of the detector's window
    assert [m["skipped_updates"] for m in got] == [0] * 14
    assert [m["spike_skipped_updates"] for m in got] == [0] * 11 + [1] * 3
    assert "step 12: loss spike, " in spiked.stderr
    assert "above the last 11 steps; update skipped (train.loss_spike_action)" in spiked.stderr
    if nproc == 2:  # no rank is slow here: none is named (train.straggler_factor=1.5 default)
        assert "straggler" not in spiked.stderr and not any("stragglers" in m for m in got)
        assert all(m["compute_s_median"] > 0 for m in got)


def test_a_slow_rank_is_named_with_its_host(tmp_path):
    """Rank 1 of 2 computes 0.5 s more per step (PRETRAIN_TEST_SLOW=1:0.5, CPU time); after
    train.straggler_steps=3 logged steps in a row it is named, with its host and its time
    against the median. (No slow rank, nothing named: the DP=2 spike test above.)"""
    proc = run_training(tmp_path / "run", ["train.steps=5", "train.straggler_steps=3",
                                           "checkpoint.save_on_stop=false"], nproc=2,
                        env_extra={"PRETRAIN_TEST_SLOW": "1:0.5"})
    host = socket.gethostname()
    named = [line for line in proc.stderr.splitlines() if "straggler" in line]
    assert len(named) == 1 and named[0].startswith(
        f"warning: step 3: straggler: rank 1 on {host} computed "), named
    assert "for 3 logged steps in a row (train.straggler_factor=1.5, train.straggler_steps=3)" \
        in named[0]
    metrics = read_metrics(tmp_path / "run")
    assert [("stragglers" in m) for m in metrics] == [False, False, True, True, True]
    for m in metrics[2:]:
        (slow,) = m["stragglers"]
        assert (slow["rank"], slow["host"]) == (1, host)
        assert slow["compute_s"] > 0.5 and slow["compute_s"] > 1.5 * slow["median_s"]


def test_a_loss_spike_rewinds_to_the_last_checkpoint_past_its_batches(tmp_path):
    """action=rewind: at the spike (step 12, checkpoint at 10) the run reloads step 10 and
    moves the loader past the batches of steps 11-12; the range is kept in the counters. A
    run stopped before the spike (step 10: the detector's window is in the checkpoint) and
    after the rewind (step 14), and resumed each time, has the same bits as one run through;
    a second spike past train.max_rewinds=1 stops the run with exit 2."""
    common = ["train.steps=16", "checkpoint.interval=10", "train.loss_spike_action=rewind",
              "train.max_rewinds=1", *SPIKE]
    env = {"PRETRAIN_TEST_SPIKE": "12"}
    whole = run_training(tmp_path / "whole", common, env_extra=env)
    assert ("step 12: loss spike, " in whole.stderr and "rewound to the checkpoint of step 10 "
            "and skipped the batches of steps 11-12 (rewind 1 of at most 1)" in whole.stderr)
    metrics = read_metrics(tmp_path / "whole")
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert [m["rewinds"] for m in metrics] == [0] * 10 + [1] * 6
    assert "loss_spike_z" not in metrics[11]  # step 12 was trained again, on another batch
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step_00000016" /
                        "train_state.json").read_text())
    assert state["counters"]["rewinds"] == [{"steps": [11, 12], "positions": [80, 96]}]
    assert state["loader"]["position"] == (16 + 2) * 8  # 16 steps' batches and the 2 skipped

    run_training(tmp_path / "split", [*common, "train.exit_at_step=10"], env_extra=env)
    run_training(tmp_path / "split", [*common, "train.exit_at_step=14"], env_extra=env)
    run_training(tmp_path / "split", common, env_extra=env)  # resumes from step 14
    split = read_metrics(tmp_path / "split")
    assert [(m["step"], m["loss"], m["lr"]) for m in split] == [
        (m["step"], m["loss"], m["lr"]) for m in metrics]
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000016" /
                        "train_state.json").read_text())
    assert state["counters"]["rewinds"] == [{"steps": [11, 12], "positions": [80, 96]}]

    halted = run_training(tmp_path / "twice", common, expect_rc=2,
                          env_extra={"PRETRAIN_TEST_SPIKE": "12,14"})
    errors = [line for line in halted.stderr.splitlines() if line.startswith("training error")]
    assert len(errors) == 1 and errors[0].startswith("training error: step 12: loss spike (")
    assert "after 1 rewind(s) (train.max_rewinds=1)" in errors[0]


# ---------------------------------------------------------------- units

def test_non_finite_guard_counts_bad_steps_in_a_row():
    guard = NonFiniteGuard(limit=2)
    assert guard.observe(float("nan"), 1.0, applied=False)
    guard.check(1, float("nan"), 1.0)
    assert not guard.observe(2.0, 1.0, applied=True)  # a good step resets the count
    assert guard.observe(2.0, float("inf"), applied=False)
    assert guard.observe(float("inf"), float("nan"), applied=True)
    with pytest.raises(Exception, match=r"2 steps in a row \(up to step 4\)"):
        guard.check(4, float("inf"), float("nan"))


def test_loss_spikes_by_zscore():
    spikes = LossSpikes(zscore=4.0, window=40)
    scores = [spikes.score(3.0 + 0.01 * (i % 5)) for i in range(40)]
    assert scores == [None] * 40
    assert spikes.score(3.5) > 4.0  # far above a quiet window
    assert spikes.score(3.02) is None
    assert LossSpikes(zscore=0.0, window=40).score(100.0) is None  # off


def test_watchdog_budget_follows_the_median_step():
    dog = Watchdog(factor=0, min_seconds=5.0, rank=0)  # factor 0: no thread, budget only
    assert dog.budget() == 5.0
    for seconds in (30.0, 1.0, 1.0, 1.2):
        dog.beat(1, seconds)
    assert dog.budget() == 5.0
    dog.factor = 10
    assert dog.budget() == pytest.approx(11.0)  # 10 x median(30, 1, 1, 1.2)


def test_guard_settings_are_checked():
    def error(*overrides):
        with pytest.raises(ConfigError) as info:
            validate(load_config(REPO / "configs" / "smoke.yaml", list(overrides)))
        return str(info.value)

    assert "train.max_bad_steps=0" in error("train.max_bad_steps=0")
    assert "train.watchdog_factor=-1.0 must be a finite number >= 0" in error(
        "train.watchdog_factor=-1")
    assert "train.loss_spike_zscore=inf" in error("train.loss_spike_zscore=.inf")
    assert "parallel.timeout_minutes=0" in error("parallel.timeout_minutes=0")
    assert error("train.loss_spike_action=skip") == (
        "train.loss_spike_action=skip needs the spike detector: set train.loss_spike_zscore > 0 "
        "(e.g. 6)")
    assert "set checkpoint.interval > 0" in error("train.loss_spike_action=rewind",
                                                  "train.loss_spike_zscore=6")
    assert "train.max_rewinds=-1 must be >= 0" in error("train.max_rewinds=-1")
    assert "train.loss_spike_action" in error("train.loss_spike_action=undo")
    assert "train.straggler_factor=0.5 must be 0 (off) or a finite number > 1" in error(
        "train.straggler_factor=0.5")
    assert "train.straggler_steps=0 must be >= 1" in error("train.straggler_steps=0")
