"""Checkpoints written by older code keep loading: tests/checkpoint/fixtures/v1_tiny/ is a
format-1 checkpoint made before the checkpoint manager was split into parts (a one-process
run of a very small model on the golden tokens, saved at step 2 of 4).

Resuming from a copy of it must continue exactly where the run that wrote it continued: the
losses of steps 3 and 4 (which depend on the weights, the Adam state, the LR schedule and
the data position) equal the ones recorded in v1_tiny.json when it was made. Regenerate
(only for a deliberate format change, keeping the old fixture as well) with:

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m tests.checkpoint.fixtures.make_v1_tiny
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoint.fixtures.make_v1_tiny import FIXTURE, HERE, overrides
from tests.launch_helpers import read_metrics, run_training

EXPECTED = json.loads((HERE / "v1_tiny.json").read_text())
TOLERANCE = 1e-5  # the golden-loss tolerance (tests/test_golden.py): kernel spread is <= 2.4e-7


@pytest.mark.skipif(torch.__version__.split("+")[0].rsplit(".", 1)[0]
                    != EXPECTED["torch"].rsplit(".", 1)[0],
                    reason=f"the fixture's losses were recorded with torch {EXPECTED['torch']}")
def test_resumes_from_a_format_1_checkpoint(tmp_path):
    from tests.golden.runs import write_shards

    data = write_shards(tmp_path / "data")
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoints")
    out = run_training(run, overrides(data))
    step = EXPECTED["step"]
    saved = run / "checkpoints" / f"step_{step:08d}"
    assert f"resumed from {saved} at step {step} (same layout)" in out.stdout, out.stdout[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(losses) == list(range(step + 1, EXPECTED["steps"] + 1))
    for s, loss in losses.items():
        want = EXPECTED["losses"][str(s)]
        assert abs(loss - want) <= TOLERANCE, (s, loss, want)
    final = json.loads((run / "checkpoints" / f"step_{EXPECTED['steps']:08d}" /
                        "train_state.json").read_text())
    assert final["counters"]["step"] == final["step"] == EXPECTED["steps"]
    assert final["loader"]["position"] == EXPECTED["loader_position"] * EXPECTED["steps"] // step


def test_weights_reader_reads_a_format_1_checkpoint(tmp_path):
    """Export and evaluation read the weights alone (no run): the fixture's too."""
    from pretrain.checkpoint.weights import read_weights

    shutil.copytree(FIXTURE, tmp_path / "checkpoints")
    got = read_weights(Path(tmp_path), verify=True)
    assert got.train_state["step"] == EXPECTED["step"]
    embedding = got.state["embedding.word_embeddings.weight"]
    assert embedding.shape[1] == 32 and torch.isfinite(embedding).all()
