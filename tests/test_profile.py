"""logging.profile: a Chrome trace of exactly the profiled steps on the listed ranks, the top
ops in the log, and a window past train.steps refused in one line."""

from __future__ import annotations

import json

import pytest

from pretrain.config import ConfigError, validate
from tests.launch_helpers import run_training


@pytest.mark.slow
def test_the_trace_holds_the_profiled_steps(tmp_path):
    run = tmp_path / "run"
    out = run_training(run, ["train.steps=6", "logging.profile.start_step=3",
                             "logging.profile.steps=2", "train.sample_tokens=0"])
    trace = run / "profile" / "trace_rank0_steps3-4.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("step ")})
    assert steps == ["step 3", "step 4"]
    assert any("aten::" in e.get("name", "") for e in events)  # the ops inside them
    assert f"profile: steps 3-4 on rank 0 -> {trace}" in out.stdout + out.stderr
    assert "Self CPU" in out.stdout + out.stderr  # the top-ops table
    assert [p.name for p in (run / "profile").iterdir()] == [trace.name]  # no temp left


@pytest.mark.parametrize("overrides, needle", [
    (["logging.profile.start_step=19", "logging.profile.steps=3"],
     "logging.profile covers steps 19-21, past train.steps=20"),
    (["logging.profile.start_step=2", "logging.profile.ranks=[0,4]"],
     "logging.profile.ranks=[0, 4] must name ranks of this run (0 to 1)"),
    (["logging.profile.start_step=2", "logging.profile.steps=0"], "must be >= 1"),
])
def test_a_profile_window_that_cannot_run_is_one_line(smoke_config, overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(smoke_config(*overrides), world_size=2, vocab_size=257)
    assert needle in str(err.value)


def test_ranks_from_the_command_line(smoke_config):
    assert smoke_config("logging.profile.ranks=0,1").logging.profile.ranks == [0, 1]
    with pytest.raises(ConfigError, match="must be a list of integers"):
        smoke_config("logging.profile.ranks=a")
