"""data.stages: the training blend switches at a step, with exact proportions within each
stage, and a resume across the switch continues the exact ordered sample ids, under another
data-parallel size too (real tar shards, the real loader)."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.config import ConfigError, validate
from tests.data.shard_writer import write_dataset
from tests.data.test_stream_loader import GLOBAL, SEQ, _global_ids

SWITCH_STEP = 3


@pytest.fixture
def two_sources(tmp_path):
    return [write_dataset(tmp_path / "web", SEQ, [30, 30], salt=0),
            write_dataset(tmp_path / "anneal", SEQ, [25], salt=1)]


def _global(paths, steps, dp_size, state=None):
    """(source salt, key) of every sample of `steps` global batches, in order. Stage 0: web
    only; from step 3 on: 1 web : 3 anneal. Ids encode key + 1000 x salt."""
    ids, state = _global_ids(paths, steps, dp_size, state=state, weights=[1.0, 0.0],
                             stages=[(SWITCH_STEP * GLOBAL, [1.0, 3.0])])
    return [divmod(i, 1000) for i in ids], state


def test_switch_at_the_step_with_exact_shares(two_sources):
    ids, _ = _global(two_sources, 7, 1)
    before, after = ids[:SWITCH_STEP * GLOBAL], ids[SWITCH_STEP * GLOBAL:]
    assert {salt for salt, _ in before} == {0}
    salts = np.array([salt for salt, _ in after])
    shares = np.cumsum(salts == 1) / np.arange(1, len(salts) + 1)
    assert abs(shares[-1] - 0.75) < 1e-9  # 32 samples: 24 anneal, 8 web
    assert np.all(np.abs(shares * np.arange(1, len(salts) + 1)
                         - 0.75 * np.arange(1, len(salts) + 1)) < 1.0)  # at every prefix
    # the web source continues where stage 0 left it, not from its start
    web_before = [key for salt, key in before if salt == 0]
    web_after = [key for salt, key in after if salt == 0]
    assert not set(web_before) & set(web_after)


@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 4), (4, 1)])
def test_resume_across_the_switch_continues_the_sequence(two_sources, dp_before, dp_after):
    reference, _ = _global(two_sources, 7, 1)
    # stop one step after the switch began, resume under another DP size
    first, state = _global(two_sources, SWITCH_STEP + 1, dp_before)
    rest, _ = _global(two_sources, 7 - SWITCH_STEP - 1, dp_after, state=state)
    assert first + rest == reference
    # and stopping exactly at the switch
    first, state = _global(two_sources, SWITCH_STEP, dp_before)
    rest, _ = _global(two_sources, 7 - SWITCH_STEP, dp_after, state=state)
    assert first + rest == reference


@pytest.mark.parametrize("stages, message", [
    ("[{at_step: 5, train: embedded}, {at_step: 3, train: embedded}]", "increasing order"),
    ("[{at_step: 20, train: embedded}]", "before train.steps=20"),
    ("[{at_step: 5}]", "must be a mapping of at_step and train"),
    ("[{at_step: 0, train: embedded}]", "must be a step number >= 1"),
])
def test_bad_stages_are_refused(smoke_config, stages, message):
    with pytest.raises(ConfigError, match=message):
        validate(smoke_config(f"data.stages={stages}"))


@pytest.mark.slow
def test_training_resumes_exactly_across_the_switch(tmp_path):
    """The training CLI: a stage switch at step 3 of 6; stopping at step 2 and at step 4 and
    resuming gives the uninterrupted run's losses to the bit and its loader position."""
    import json

    from tests.launch_helpers import read_metrics, run_training

    web = write_dataset(tmp_path / "web", 32, [64], salt=1)
    anneal = write_dataset(tmp_path / "anneal", 32, [64], salt=2)
    common = [f"data.train={web}", f"data.stages=[{{at_step: 3, train: {anneal}}}]",
              "model.vocab_size=60000", "train.steps=6", "optim.warmup_steps=1"]
    full, split = tmp_path / "full", tmp_path / "split"
    run_training(full, common)
    run_training(split, common + ["train.exit_at_step=2"])
    run_training(split, common + ["train.exit_at_step=4"])
    run_training(split, common)
    series = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(full)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(split)] == series

    def loader(run):
        path = run / "checkpoints" / "step_00000006" / "train_state.json"
        return json.loads(path.read_text())["loader"]

    assert loader(split) == loader(full)
    assert loader(full)["consumed"] == [3 * 8, 3 * 8]  # 3 steps of web, then 3 of anneal
