"""Async saves copy the state into host buffers that are reused from save to save
(pretrain/checkpoint/staging.py); pinned buffers are exercised by tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from pretrain.checkpoint.staging import HostStaging


def _sharded(weight, moment):
    return {"model": {"w": ShardedTensor.from_rank_offsets("model.w", weight, replica_id=0)},
            "optimizer": {"exp_avg": {"p0": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.model.w", moment, replica_id=0)}}}


def test_staged_copies_are_snapshots_in_reused_buffers():
    staging = HostStaging(pin=False)
    weight, moment = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    first = staging.stage(_sharded(weight, moment))
    staged_weight = first["model"]["w"].data
    assert staged_weight is not weight and torch.equal(staged_weight, weight)
    weight.add_(10)  # training goes on: the staged copy keeps the values of the save
    assert torch.equal(staged_weight, torch.arange(6.0).view(2, 3))
    assert first["model"]["w"].key == "model.w" and first["model"]["w"].global_shape == (2, 3)

    second = staging.stage(_sharded(weight, moment))
    assert second["model"]["w"].data is staged_weight  # the same buffer, refilled
    assert torch.equal(staged_weight, weight)
    assert staging.nbytes == 2 * 6 * 4


def test_tensors_copied_by_gather_are_not_copied_twice():
    staging = HostStaging(pin=False)
    moment = staging.copy(("optimizer", 0, "exp_avg"), torch.full((2, 3), 3.0))
    staged = staging.stage(_sharded(torch.zeros(2, 3), moment))
    assert staged["optimizer"]["exp_avg"]["p0"].data is moment
    assert len(staging.buffers) == 2


@pytest.mark.slow
def test_async_save_reports_its_stall(tmp_path):
    """The training path's share of an async save is logged, split into its parts, and
    recorded in the next step's metrics."""
    from tests.launch_helpers import read_metrics, run_training

    result = run_training(tmp_path, ["train.steps=3", "checkpoint.async_save=on",
                                     "checkpoint.interval=2"])
    output = result.stdout + result.stderr
    assert "GiB to host" in output
    assert "start-up: " in output and "model build and init" in output  # where start-up goes
    records = {m["step"]: m for m in read_metrics(tmp_path)}
    assert "save_stall_s" in records[3] and "save_stall_s" not in records[2]
    assert 0 < records[3]["save_stall_s"] < 60
