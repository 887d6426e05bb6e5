"""`python -m pretrain.plan budget`: shapes, layouts that fit memory per estimate.py, the
time from the MFU, the written config (valid for the trainer), and the one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import load_config, validate
from pretrain.model.estimate import flops_per_token, memory_per_rank
from pretrain.plan.budget import MEMORY_HEADROOM, MEASURED_MFU, make_plan
from pretrain.plan.law import PUBLISHED
from pretrain.plan.runs import PlanError, matmul_parameters
from tests.launch_helpers import REPO, clean_env

LAW = PUBLISHED["besiroglu2024"]


@pytest.mark.parametrize("gpus, gpu, memory, flops", [
    (8, "H100", 80, 1e21), (64, "H100", 80, 3.35e22), (256, "H200", 141, 5.9e23),
    (16, "A100", 40, 1e22)])
def test_plan_fits_memory_and_spends_the_budget(gpus, gpu, memory, flops):
    plan = make_plan(LAW, gpus, gpu, MEASURED_MFU, 32000, 2048, memory, flops=flops)
    cfg = plan.cfg
    layout = validate(cfg, world_size=gpus, vocab_size=32000, cuda=True)
    used = memory_per_rank(cfg, 32000, layout.data_parallel, bf16=True).total_bytes
    assert used <= MEMORY_HEADROOM * memory * 2 ** 30
    # the shape is the compute-optimal size within 15%, and the tokens spend the budget
    optimal_params, _ = LAW.optimal(flops)
    assert matmul_parameters(cfg, 32000) == pytest.approx(optimal_params, rel=0.15)
    assert plan.tokens * flops_per_token(cfg, 32000) == pytest.approx(flops, rel=1e-9)
    # time = tokens / (gpus x peak x MFU / FLOPs per token)
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}[gpu]
    assert plan.wall_seconds == pytest.approx(flops / (gpus * peak * MEASURED_MFU), rel=1e-9)
    assert plan.predicted_loss == pytest.approx(LAW.loss(plan.params, plan.tokens))
    assert cfg.train.steps * cfg.train.global_batch_size * 2048 >= plan.tokens


def test_seventy_b_needs_model_parallelism():
    plan = make_plan(LAW, 256, "H100", MEASURED_MFU, 32000, 4096, 80, params=70e9, tokens=1.4e12)
    p = plan.cfg.parallel
    assert p.tensor_parallel * p.pipeline_parallel > 1  # 70B does not fit DP-only
    assert plan.params == pytest.approx(70e9, rel=0.15)


def test_budget_too_small_and_no_layout():
    with pytest.raises(PlanError, match="below the smallest shape"):
        make_plan(LAW, 1, "H100", MEASURED_MFU, 32000, 2048, 80, flops=1e14)
    with pytest.raises(PlanError, match="no layout of 1 GPUs with 8 GiB"):
        make_plan(LAW, 1, "H100", MEASURED_MFU, 32000, 2048, 8, params=20e9, tokens=1e9)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.plan", *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def test_cli_writes_a_config_the_trainer_accepts(tmp_path):
    out = tmp_path / "plan.yaml"
    done = _cli("budget", "--gpus", "16", "--gpu", "h100", "--days", "2", "--data", "embedded",
                "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "sbatch: CONFIG=" in done.stdout and "--nodes=2" in done.stdout
    cfg = load_config(out)
    assert cfg.optim.schedule == "wsd" and cfg.data.train[0]["path"] == "embedded"
    validate(cfg, world_size=16, vocab_size=32000, cuda=True)


@pytest.mark.parametrize("args, message", [
    (["budget", "--gpu", "tpu9", "--days", "1"], "--gpu tpu9: memory size unknown; pass --gpu-memory"),
    (["budget", "--flops", "1e12"], "below the smallest shape"),
    (["fit", "a", "b"], "needs at least 3 runs"),
])
def test_cli_refusals_are_one_line(args, message):
    done = _cli(*args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
