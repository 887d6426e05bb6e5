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
