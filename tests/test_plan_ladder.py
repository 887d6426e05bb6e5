"""`python -m pretrain.plan ladder`: every branch starts its decay at a checkpoint its main
run saves and keeps, inside that run's stable phase; the written configs load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config, validate
from pretrain.plan.ladder import ladder_configs, write_ladder
from pretrain.plan.runs import PlanError


def test_branches_start_from_kept_stable_checkpoints(tmp_path):
    mains, branches = ladder_configs(5, 5e5, 5e6, [5, 10, 20, 40], 256, 32, 8, "embedded",
                                     tmp_path, 1e-3)
    assert len(mains) == 5 and len(branches) == 15
    for main in mains:
        ckpt, steps = main["checkpoint"], main["train"]["steps"]
        stable_end = steps - main["optim"]["decay_steps"]
        mine = [b for b in branches
                if Path(b["checkpoint"]["load_from"]).parent.parent == Path(main["run"]["dir"])]
        assert len(mine) == 3
        for branch in mine:
            point = int(Path(branch["checkpoint"]["load_from"]).name.removeprefix("step_"))
            assert point % ckpt["interval"] == 0 and point % ckpt["keep_every"] == 0  # kept
            assert main["optim"]["warmup_steps"] < point < stable_end  # in the stable phase
            # the branch's decay begins exactly at the step it loads
            assert branch["train"]["steps"] - branch["optim"]["decay_steps"] == point
            assert 0.1 < branch["optim"]["decay_steps"] / branch["train"]["steps"] < 0.3
    assert len({(m["model"]["num_layers"], m["model"]["hidden_size"]) for m in mains}) == 5

    written = write_ladder(mains, branches, tmp_path / "ladder", gpus=1)
    assert (tmp_path / "ladder" / "submit.sh") in written
    assert "#SBATCH --array=0-14" in (tmp_path / "ladder" / "ladder_branch.sbatch").read_text()
    for path in written:
        if path.suffix == ".yaml":
            validate(load_config(path), world_size=1, vocab_size=256)


def test_too_few_sizes_are_refused(tmp_path):
    with pytest.raises(PlanError, match="at least 3 points"):
        ladder_configs(2, 5e5, 5e6, [5, 10], 256, 32, 8, "embedded", tmp_path, 1e-3)


def test_sizes_that_share_a_shape_are_refused(tmp_path):
    # 5e5 and 6e5 both round to the smallest shape: a fit would see one size twice
    with pytest.raises(PlanError, match="distinct model shapes"):
        ladder_configs(3, 5e5, 6e5, [5, 10], 256, 32, 8, "embedded", tmp_path, 1e-3)
