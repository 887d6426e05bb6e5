"""WSD runs through the real training CLI: exact resume across the start of the decay (with
z-loss and sinusoidal positions on), and a decay branched off a stable-phase checkpoint.

Branch: a WSD run of 8 steps with a 2-step decay is stable through step 6; loading its
step-4 checkpoint into a new directory with train.steps=6 (decay over steps 5-6) must give
exactly, to the bit, the run that was planned as 6 steps from the start: same weights,
optimizer state, data position and the decayed rates from the first resumed step on.
"""

from __future__ import annotations

import pytest

from tests.launch_helpers import read_metrics, run_training

# Every test here starts the training CLI (some over several ranks): the full lane only.
pytestmark = pytest.mark.slow

WSD = ["train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1",
       "optim.schedule=wsd", "optim.decay_steps=2", "optim.min_lr=0"]


def _series(run_dir):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)]


def test_wsd_z_loss_sinusoidal_exact_resume_across_the_decay(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    # z-loss and sinusoidal positions hold no state, but their paths must stay bit-exact too
    z_loss = ["optim.z_loss=0.01", "model.position_embedding=sinusoidal"]
    run_training(full, WSD + z_loss + ["train.steps=6"])
    run_training(split, WSD + z_loss + ["train.steps=6", "train.exit_at_step=4"])
    run_training(split, WSD + z_loss + ["train.steps=6"])
    assert _series(split) == _series(full)
    lrs = [lr for _, _, lr, _ in _series(full)]
    assert lrs[1:4] == [lrs[1]] * 3 and lrs[3] > lrs[4] > lrs[5] == 0.0  # stable, decay, 0


def test_wsd_branch_from_stable_checkpoint(tmp_path):
    main, branch, planned = tmp_path / "main", tmp_path / "branch", tmp_path / "planned"
    run_training(main, WSD + ["train.steps=8", "train.exit_at_step=4"])
    out = run_training(branch, WSD + ["train.steps=6",
                                      f"checkpoint.load_from={main / 'checkpoints'}"])
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    run_training(planned, WSD + ["train.steps=6"])
    assert [s for s, *_ in _series(branch)] == [5, 6]
    assert _series(branch) == _series(planned)[4:]
    assert _series(branch)[-1][2] == 0.0
