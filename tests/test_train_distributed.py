"""Multi-process training over gloo: TP2, PP2 (4 micro-batches), DP2 with ZeRO-1 and ZeRO-2.

Each layout trains the same model on a repeated global batch; the loss must be finite and
fall, and per step it must equal the single-process run's (the full parity suite, with
every layout at a tighter tolerance, is tests/parity/test_layout_parity.py).
"""

from __future__ import annotations

import math

import pytest

from tests.launch_helpers import read_metrics, run_training

pytestmark = pytest.mark.multiprocess

# 8 global / 2 micro = 4 micro-batches on one rank, 2 per rank under DP2.
COMMON = ["train.steps=6", "data.repeat_first_batch=true", "optim.warmup_steps=1",
          "optim.lr=1e-2", "optim.min_lr=5e-3",
          "train.micro_batch_size=2", "train.global_batch_size=8"]
# Same model and data, different reduction order: agreement to ~1e-6 is typical; 1e-4 leaves
# room for summation-order effects while catching any scaling or routing bug (those are >1%).
RTOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_training(run_dir, COMMON)
    return read_metrics(run_dir)


LAYOUTS = {
    "tp2": ["parallel.tensor_parallel=2"],
    "pp2": ["parallel.pipeline_parallel=2"],
    "dp2_zero1": ["parallel.zero_stage=1"],
    "dp2_zero2": ["parallel.zero_stage=2"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_trains_and_matches_single_process(layout, reference, tmp_path):
    run_training(tmp_path, COMMON + LAYOUTS[layout], nproc=2)
    metrics = read_metrics(tmp_path)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 6
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], f"{layout}: loss did not fall on a repeated batch: {losses}"
    for mine, ref in zip(metrics, reference):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=RTOL), (layout, mine["step"])
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), (layout, mine["step"])


def test_single_process_metrics_and_run_dir(reference, tmp_path):
    keys = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert [m["step"] for m in reference] == list(range(1, 7))
    for record in reference:
        assert keys <= record.keys()
    assert reference[-1]["tokens"] == 6 * 8 * 32
    assert reference[-1]["loss"] < 0.8 * reference[0]["loss"]


def test_exit_at_step_keeps_the_schedule(tmp_path, reference):
    proc = run_training(tmp_path, COMMON + ["train.exit_at_step=3"])
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Same LR schedule (train.steps unchanged) and same trajectory as the full run.
    assert [m["lr"] for m in metrics] == [m["lr"] for m in reference[:3]]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference[:3]]
    assert (tmp_path / "config.yaml").is_file()
    assert "run directory:" in proc.stdout


def test_pipeline_sampling_prints_text(tmp_path):
    proc = run_training(tmp_path, ["train.steps=2", "train.sample_tokens=16",
                                   "parallel.pipeline_parallel=2", "parallel.tensor_parallel=1"],
                        nproc=2)
    assert "---- sample ----" in proc.stdout
    text = proc.stdout.split("---- sample ----\n", 1)[1].split("\n----------------", 1)[0]
    assert text.startswith("def ") and len(text) > 4


def test_world_size_that_does_not_fit_the_layout_fails_before_any_process_group():
    """torchrun's variables say 3 ranks; TP=2 cannot divide that. The check runs before
    init_process_group, so no MASTER_ADDR is needed and nothing hangs waiting for peers."""
    import os
    import subprocess
    import sys

    from tests.launch_helpers import REPO

    env = dict(os.environ, RANK="0", WORLD_SIZE="3", LOCAL_RANK="0")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config",
                           "configs/smoke.yaml", "parallel.tensor_parallel=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1
    assert "world size 3" in errors[0] and "tensor_parallel x pipeline_parallel" in errors[0]
