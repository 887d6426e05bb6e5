"""GPU-only checks (bf16, the Transformer Engine / SDPA backend choice). Skipped without CUDA;
run them on a lent GPU machine with `python -m pytest -q tests/test_gpu.py`."""

from __future__ import annotations

import math

import pytest
import torch

from tests.launch_helpers import read_metrics, run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_training_on_gpu_falls_on_a_repeated_batch(tmp_path):
    run_training(tmp_path, ["train.steps=8", "data.repeat_first_batch=true", "optim.lr=1e-2",
                            "optim.warmup_steps=1", "parallel.precision=bf16"])
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0]


def test_backend_auto_prefers_transformer_engine_when_importable():
    from pretrain.model.spec import choose_backend, transformer_engine_usable

    assert choose_backend("auto") == ("te" if transformer_engine_usable() else "local")


COMPILE_RUN = ["train.steps=10", "optim.lr=1e-2", "optim.warmup_steps=1",
               "parallel.precision=bf16", "checkpoint.async_save=on"]


def test_compiled_and_eager_runs_agree_in_bf16(tmp_path):
    """model.compile (inductor regions, fused bf16 cross entropy) against eager, 10 steps.
    bf16 rounds each elementwise result; fused kernels round fewer intermediates, so the
    two differ by a few bf16 ulps of the loss, not more."""
    run_training(tmp_path / "eager", COMPILE_RUN + ["model.compile=off"])
    run_training(tmp_path / "compiled", COMPILE_RUN + ["model.compile=on"])
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 10
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a["step"], a["loss"], b["loss"])


def test_compiled_run_resumes_bit_exactly(tmp_path):
    """Stop at step 5 (async save through the pinned host buffers), resume, and steps 6-10
    equal the uninterrupted compiled run's to the bit."""
    common = COMPILE_RUN + ["model.compile=on", "checkpoint.interval=5"]
    run_training(tmp_path / "full", common)
    run_training(tmp_path / "split", common + ["train.exit_at_step=5"])
    run_training(tmp_path / "split", common)
    full = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "full")]
    split = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "split")]
    assert split == full
