"""ZeRO really shards: what each data-parallel rank holds, measured, against the expected
1/DP share and against the `--dry-run` estimate (`pretrain.model.estimate.memory_per_rank`).

`zero_memory_probe.py` builds what `pretrain/train.py` builds, trains two steps under
torchrun and writes, per rank, the bytes of distinct storage held for parameters, gradients
(just before `engine.step()`, when the step's gradients are all held) and optimizer state
(after training). Expected values are analytic from P, the parameter count of the built
model (fp32, so 4 bytes per element):

* optimizer state (ZeRO >= 1): Adam's exp_avg + exp_avg_sq (8P) and DeepSpeed's fp32 master
  partition (4P; a separate copy even in fp32), each split 1/DP;
* gradients: whole (4P) at ZeRO-1; at ZeRO-2 the `grads_in_partition` buffer, which holds
  every parameter that overlaps the rank's partition in full (exact rule below); 4P/DP at
  ZeRO-3;
* parameters: whole (4P) at ZeRO-1/2, 4P/DP at ZeRO-3.

Runtime: four torchrun launches of the probe, about 60 s on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pretrain.model.estimate import zero12_partition
from tests.launch_helpers import launch

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("zero_memory_probe.py")
SMOKE = REPO / "configs" / "smoke.yaml"
# Big enough that a 1/DP share is hundreds of KiB (P = 279,168), small enough for seconds.
MODEL = ["model.hidden_size=128", "model.num_layers=2", "train.steps=2",
         "optim.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=8"]
TOL = 0.05  # relative
FP32 = 4  # bytes per element

LAYOUTS = {  # name: (ranks, ZeRO stage); TP = PP = 1, so DP = ranks
    "dp2_zero1": (2, 1),
    "dp2_zero2": (2, 2),
    "dp2_zero3": (2, 3),
    "dp4_zero1": (4, 1),
}


def _launch(nproc: int, out: Path, overrides: list[str], timeout: int = 240) -> None:
    launch([str(PROBE), "--out", str(out), "--config", str(SMOKE), *overrides], nproc, timeout,
           "probe")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """layout name -> (overrides, per-rank records); each layout is launched once, on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            nproc, stage = LAYOUTS[name]
            root = tmp_path_factory.mktemp(name)
            overrides = MODEL + [f"parallel.zero_stage={stage}", f"run.dir={root / 'run'}",
                                 "checkpoint.save_on_stop=false"]
            _launch(nproc, root / "probe", overrides)
            records = [json.loads((root / "probe" / f"rank{r}.json").read_text())
                       for r in range(nproc)]
            cache[name] = (overrides, records)
        return cache[name]

    return get


def close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= TOL * expected


def _check_common(name, records):
    nproc, stage = LAYOUTS[name]
    assert len(records) == nproc
    for rec in records:
        assert rec["data_parallel"] == nproc, rec
        assert rec["engine_zero_stage"] == stage, f"{name}: engine ran ZeRO-{rec['engine_zero_stage']}"
        assert rec["bf16"] is False
        assert len(rec["steps"]) == 2 and all(math.isfinite(s["loss"]) for s in rec["steps"])
    return nproc, stage, records[0]["param_count"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_optimizer_state_is_one_dp_share(name, measured):
    _, records = measured(name)
    dp, stage, params = _check_common(name, records)
    for rec in records:
        where = f"{name} rank {rec['rank']}"
        assert rec["optimizer_class"].endswith(
            "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"), where
        # Adam exp_avg + exp_avg_sq of this rank's partition only.
        assert close(rec["moment_bytes"], 2 * FP32 * params / dp), (where, rec["moment_bytes"])
        # The fp32 master partition, a copy of 1/DP of the weights.
        assert not rec["master_aliases_params"], where
        assert close(rec["master_bytes"], FP32 * params / dp), (where, rec["master_bytes"])
        assert close(rec["optimizer_bytes"], 3 * FP32 * params / dp), (where, rec["optimizer_bytes"])
    # The shares tile the model: together the ranks hold each element's state once (plus
    # DeepSpeed's alignment padding).
    masters = sum(rec["master_numel"] for rec in records)
    if stage in (1, 2):
        assert masters == sum(zero12_partition(records[0]["group_param_numels"], dp, r)[0]
                              for r in range(dp))
    assert params <= masters <= params * (1 + TOL)
    assert sum(rec["moment_numel"] for rec in records) == 2 * masters


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_partitioned_from_zero2(name, measured):
    _, records = measured(name)
    dp, stage, params = _check_common(name, records)
    full = FP32 * params
    for rec in records:
        where = f"{name} rank {rec['rank']}"
        grad = rec["grad_bytes"]
        if stage == 1:
            assert close(grad, full), (where, grad)  # reduced only at step(): whole
        elif stage == 2:
            _, held = zero12_partition(rec["group_param_numels"], dp, rec["dp_rank"])
            assert grad == FP32 * held, (where, grad, FP32 * held)
            assert grad < 0.75 * full, (where, grad)
        else:
            assert close(grad, full / dp), (where, grad)
        if stage in (1, 2):
            assert rec["grad_bytes_after_step"] == 0, where  # released by step()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parameters_partitioned_at_zero3(name, measured):
    _, records = measured(name)
    dp, stage, params = _check_common(name, records)
    for rec in records:
        where = f"{name} rank {rec['rank']}"
        expected = FP32 * params / (dp if stage == 3 else 1)
        assert close(rec["param_bytes"], expected), (where, rec["param_bytes"], expected)
        assert rec["gathered_param_bytes"] == 0, where  # nothing left gathered after the step


# The estimate's current errors against DeepSpeed 0.19.8 in fp32 (see the probe's numbers).
# strict: once estimate.py is corrected these XPASS and fail; then delete the entry.
KNOWN_WRONG: dict = {}  # estimate errors found here are fixed in pretrain/model/estimate.py
TERMS = {"weights": ("weight_bytes", "param_bytes"), "grads": ("grad_bytes", "grad_bytes"),
         "optimizer": ("optimizer_bytes", "optimizer_bytes")}


def _estimate_cases():
    for name, (_, stage) in LAYOUTS.items():
        for term in TERMS:
            stages, reason = KNOWN_WRONG.get(term, (set(), ""))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if stage in stages else []
            yield pytest.param(name, term, marks=marks, id=f"{name}-{term}")


@pytest.mark.parametrize(("name", "term"), list(_estimate_cases()))
def test_dry_run_estimate_matches_measured(name, term, measured):
    from pretrain.config import load_config
    from pretrain.model.estimate import memory_per_rank, parameter_counts

    overrides, records = measured(name)
    dp, _, params = _check_common(name, records)
    cfg = load_config(SMOKE, overrides)
    vocab = records[0]["vocab_size"]
    assert parameter_counts(cfg, vocab)["total"] == params
    estimate = memory_per_rank(cfg, vocab, dp, bf16=False)
    assert estimate.parameters == params
    estimate_key, measured_key = TERMS[term]
    expected = getattr(estimate, estimate_key)
    largest = max(rec[measured_key] for rec in records)  # the estimate is for the largest rank
    assert close(largest, expected), (f"{name} {term}: measured {largest} bytes on the largest "
                                      f"rank, --dry-run estimate {expected}")
