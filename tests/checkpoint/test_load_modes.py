"""Starting from someone else's checkpoint (`checkpoint.load_from`, full or weights only),
and refusing checkpoints that do not fit this run with one line naming the mismatch."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.data.shard_writer import write_dataset
from tests.launch_helpers import read_metrics, run_training

# Every test here starts the training CLI (some over several ranks): the full lane only.
pytestmark = pytest.mark.slow

BASE = ["train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished 4-step run (checkpoint at step 4) with a validation loss at the end."""
    run_dir = tmp_path_factory.mktemp("source")
    run_training(run_dir, BASE + ["train.eval_interval=4", "train.eval_batches=2"])
    return run_dir


def test_load_from_continues_in_a_new_directory(tmp_path, source_run):
    """A full load from another run's checkpoint continues its training exactly as resuming
    in the source directory itself would: same optimizer, step, LR schedule position and
    data position."""
    longer = ["train.steps=6"] + BASE[1:] + ["train.eval_interval=4", "train.eval_batches=2"]
    extended = tmp_path / "extended"
    shutil.copytree(source_run, extended)
    run_training(extended, longer)  # resumes from its own step 4
    fork = tmp_path / "fork"
    out = run_training(fork, longer + [
        f"checkpoint.load_from={source_run / 'checkpoints' / 'step_00000004'}"])
    assert "at step 4 (same layout)" in out.stdout
    got = [(r["step"], r["loss"]) for r in read_metrics(fork)]
    want = [(r["step"], r["loss"]) for r in read_metrics(extended) if r["step"] > 4]
    assert [s for s, _ in got] == [5, 6]
    assert got == want


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.zero_stage=3"])],
                         ids=["one_process", "dp2_zero3"])
def test_weights_only_starts_a_new_run(tmp_path, source_run, nproc, layout):
    """Weights-only: step 0, fresh optimizer and data position, the source's weights. With a
    vanishing LR the first step leaves the weights as loaded, so the validation loss after
    it equals the source's final one (also with the weights cut into ZeRO-3's slices)."""
    run_dir = tmp_path / "finetune"
    out = run_training(run_dir, BASE + layout + [
        "train.exit_at_step=1", "train.eval_interval=1", "train.eval_batches=2",
        "optim.lr=1e-30", "optim.min_lr=0", "optim.warmup_steps=0",
        f"checkpoint.load_from={source_run}", "checkpoint.weights_only=true"], nproc)
    assert "loaded weights of step 4" in out.stdout and "fresh optimizer, step 0" in out.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1]
    source_val = read_metrics(source_run)[-1]["val_loss"]
    assert records[0]["val_loss"] == pytest.approx(source_val, rel=1e-6)
    state = json.loads((run_dir / "checkpoints" / "step_00000001" / "train_state.json").read_text())
    assert state["optimizer_step"] == 1 and state["loader"]["position"] == 8
    assert state["counters"]["step"] == 1 and state["counters"]["skipped"] == 0
    assert set(state["scheduler"]) >= {"base_lrs", "last_epoch"} and "lr_lambdas" not in state["scheduler"]


def test_resume_prefers_own_checkpoints_over_load_from(tmp_path, source_run):
    run_dir = tmp_path / "run"
    run_training(run_dir, BASE + ["train.exit_at_step=2"])
    out = run_training(run_dir, BASE + [f"checkpoint.load_from={source_run}"])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'}" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=128", "model.hidden_size=64 there, 128 here"),
    ("model.vocab_size=1000", "padded_vocab_size=384 there, 1024 here"),
])
def test_model_mismatch_is_one_line(tmp_path, source_run, override, message):
    out = run_training(tmp_path / "run", BASE + [
        override, f"checkpoint.load_from={source_run}"], expect_rc=2)
    errors = [line for line in out.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_tokenizer_mismatch_is_one_line(tmp_path):
    a = write_dataset(tmp_path / "a", 32, [40], tokenizer_sha="aaaa1111" * 8)
    b = write_dataset(tmp_path / "b", 32, [40], tokenizer_sha="bbbb2222" * 8)
    source = tmp_path / "source"
    run_training(source, BASE + ["train.exit_at_step=1", f"data.train={a}"])
    out = run_training(tmp_path / "run", BASE + [f"data.train={b}", f"checkpoint.load_from={source}"],
                       expect_rc=2)
    errors = [line for line in out.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert len(errors) == 1 and "tokenizer sha256 aaaa1111aaaa" in errors[0] \
        and "bbbb2222bbbb" in errors[0], out.stderr[-2000:]


def test_changed_data_is_refused(tmp_path):
    a = write_dataset(tmp_path / "a", 32, [40])
    b = write_dataset(tmp_path / "b", 32, [41])  # same tokenizer, different shards
    source = tmp_path / "source"
    run_training(source, BASE + ["train.exit_at_step=1", f"data.train={a}"])
    out = run_training(tmp_path / "run", BASE + [f"data.train={b}", f"checkpoint.load_from={source}"],
                       expect_rc=2)
    assert "checkpoint error:" in out.stderr and "different data sources" in out.stderr
    # Resuming in the source directory itself with other data is refused earlier, as a
    # directory that belongs to another run.
    out = run_training(source, BASE + [f"data.train={b}"], expect_rc=2)
    assert f"config error: run.dir={source} belongs to another run: its config.yaml has " \
        f"data.train=" in out.stderr


def test_bad_load_from_path(tmp_path):
    out = run_training(tmp_path / "run", BASE + [f"checkpoint.load_from={tmp_path / 'nope'}"],
                       expect_rc=2)
    assert "checkpoint error: checkpoint.load_from=" in out.stderr and "no such file" in out.stderr
