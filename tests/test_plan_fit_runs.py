"""`python -m pretrain.plan fit` on real run directories: three tiny runs of the training CLI
(two widths, two lengths), their final val_loss fitted, and runs of other data refused."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.launch_helpers import launch, run_training

pytestmark = pytest.mark.slow

LADDER = {"w32_s4": ["model.hidden_size=32", "train.steps=4"],
          "w64_s4": ["model.hidden_size=64", "train.steps=4"],
          "w64_s8": ["model.hidden_size=64", "train.steps=8"]}
COMMON = ["train.eval_interval=100", "train.eval_batches=1", "optim.warmup_steps=1",
          "optim.schedule=wsd", "optim.decay_fraction=0.5"]


def test_fit_reads_a_ladder_and_refuses_mixed_data(tmp_path):
    runs = []
    for name, overrides in LADDER.items():
        run_training(tmp_path / name, COMMON + overrides)
        runs.append(str(tmp_path / name))
    done = launch(["-m", "pretrain.plan", "fit", *runs, "--bootstrap", "5",
                   "--output", str(tmp_path / "law.yaml")], 1, 300, "fit")
    assert "fitted on 3 runs" in done.stdout and "compute-optimal: N(C) =" in done.stdout
    for name in LADDER:
        assert f"{name}: N=" in done.stdout
    law = yaml.safe_load((tmp_path / "law.yaml").read_text())
    assert {"E", "A", "B", "alpha", "beta"} <= set(law)

    # A run of other data: its config.yaml names another corpus (edited copy of a run).
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "w64_s8", other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["train"] = [{"path": "data/other", "weight": 1.0}]
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused = launch(["-m", "pretrain.plan", "fit", *runs[:2], str(other)], 1, 120, "fit",
                     expect_rc=2)
    assert "differ in data" in refused.stderr and "fit runs of one data set" in refused.stderr
