"""Shared fixtures.

The budget plugin (tests/budget.py) reports each area's time against docs/testing.md.
tests/zygote.py's fork server (tests/zygote_server.py), started by the first test that launches
a CLI, is stopped when the session ends.

`single_rank_parallel` brings up a one-process gloo group and megatron's parallel_state
(TP=1, PP=1) once per test session: torch.distributed and parallel_state can only be
initialized once per process, so every test that builds a megatron model shares it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
SEED = 1234

pytest_plugins = ["tests.budget"]

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def pytest_sessionfinish(session, exitstatus):
    from tests import zygote

    zygote.stop()


def pytest_terminal_summary(terminalreporter):
    from tests import zygote

    if zygote.STATS["forked"] or zygote.STATS["fresh"]:
        terminalreporter.write_line(zygote.summary())


@pytest.fixture(scope="session")
def single_rank_parallel():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.parallel import cpu
    from pretrain.parallel import dist as pdist

    saved = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    cpu.enable()
    if not dist.is_initialized():
        pdist.init_process_group(pdist.ProcessEnv(0, 1, 0, "single"))
    if not parallel_state.model_parallel_is_initialized():
        pdist.init_model_parallel(1, 1, 1, SEED)
    # init_process_group exports the launcher variables; keep them out of subprocesses that
    # later tests start (a child would otherwise believe it is rank 0 of a torchrun job).
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    yield
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def smoke_config():
    """Factory: the smoke config with dotted overrides applied."""
    from pretrain.config import load_config

    def make(*overrides: str):
        return load_config(SMOKE, list(overrides))

    return make


@pytest.fixture
def build_model(single_rank_parallel):
    """Factory: this (single) rank's model chunks for a config, fp32 on the CPU."""
    from pretrain.config import validate
    from pretrain.model.gpt import build_model_chunks

    def build(cfg, vocab_size: int = 257):
        layout = validate(cfg, world_size=1, vocab_size=vocab_size)
        return build_model_chunks(cfg, layout.padded_vocab_size, torch.float32,
                                  torch.device("cpu"))

    return build
