"""pretrain/errors.py: one line and one exit status per error, the same table in
docs/failures.md and in slurm/pretrain_1b.sh, and every entry point going through it."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest

from pretrain import errors
from pretrain.errors import (EXIT_BAD_INPUT, EXIT_HUNG, EXIT_INTERRUPTED, EXIT_PREFLIGHT,
                             EXIT_REQUEUE, CheckpointError, ConfigError, DataError, PeerStopped,
                             PreflightError, TrainingHalted, report)

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["pretrain/train.py", "pretrain/evaluate.py", "pretrain/export_hf.py",
                "pretrain/plot.py", "pretrain/plan/__main__.py", "data_tools/shard.py",
                "data_tools/train_tokenizer.py", "data_tools/inspect_shards.py",
                "launch/preflight.py", "launch/env.py"]


def _report(err, **kw) -> tuple[int, str]:
    out = io.StringIO()
    status = report(err, file=out, **kw)
    return status, out.getvalue()


@pytest.mark.parametrize("err, line, status", [
    (ConfigError("train.lr=-1 must be > 0"), "config error: train.lr=-1 must be > 0\n", 2),
    (DataError("d/manifest.json: field seq_len is missing"),
     "data error: d/manifest.json: field seq_len is missing\n", 2),
    (CheckpointError("step_3: truncated"), "checkpoint error: step_3: truncated\n", 2),
    (TrainingHalted("3 steps in a row"), "training error: 3 steps in a row\n", 2),
    (PreflightError("node 1 runs other code"), "preflight: node 1 runs other code\n", 3),
    (ConfigError("first\nsecond"), "config error: first second\n", 2),
])
def test_each_error_is_one_line_and_its_status(err, line, status):
    assert _report(err) == (status, line)


def test_rank_zero_speaks_for_all_unless_one_rank_found_it():
    err = DataError("shard x corrupt")
    assert _report(err, rank=1, world_size=2) == (EXIT_BAD_INPUT, "")
    assert _report(err, rank=1, world_size=2, every_rank=True) == \
        (EXIT_BAD_INPUT, "data error: shard x corrupt (rank 1)\n")
    assert _report(err, rank=0, world_size=1, every_rank=True) == \
        (EXIT_BAD_INPUT, "data error: shard x corrupt\n")  # one process: no rank to name
    assert _report(PeerStopped("another rank stopped"), every_rank=True) == (EXIT_BAD_INPUT, "")
    assert _report(DataError("bad --x"), label="error") == (EXIT_BAD_INPUT, "error: bad --x\n")


def test_what_is_not_a_user_error_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        report(ZeroDivisionError("a bug"))
    assert report(KeyboardInterrupt()) == EXIT_INTERRUPTED
    # The old homes of the error types hand out the same classes (one `except` catches all).
    from pretrain.checkpoint.store import CheckpointError as from_store
    from pretrain.config import ConfigError as from_config
    from pretrain.data.formats import DataError as from_formats
    from pretrain.data.tokenizers import TokenizerError
    from data_tools.shard_lib.errors import ShardError
    assert (from_store, from_config, from_formats) == (CheckpointError, ConfigError, DataError)
    assert issubclass(TokenizerError, DataError) and issubclass(ShardError, DataError)


def _statuses() -> dict[str, int]:
    return {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}


def test_the_table_in_docs_is_errors_py():
    text = (REPO / "docs" / "failures.md").read_text()
    table = text.split("## Exit statuses", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(EXIT_\w+)` \|", table, re.M)
    assert {name: int(status) for status, name in rows} == _statuses()


def test_the_slurm_script_follows_the_table():
    script = (REPO / "slurm" / "pretrain_1b.sh").read_text()
    assert f"EXIT_REQUEUE={EXIT_REQUEUE} " in script
    case = script[script.index('case "$RC" in'):script.index("esac")]
    branches = re.findall(r'^\s+([^\s)]+)\)', case, re.M)
    assert branches == ["0", '"$EXIT_REQUEUE"', str(EXIT_BAD_INPUT), "*"], branches
    assert re.search(r"\*\)(.|\n)*scontrol requeue", case)  # a hang (76) or crash: requeued
    assert EXIT_HUNG not in (0, EXIT_REQUEUE, EXIT_BAD_INPUT)
    preflight = script[script.index("-m launch.preflight"):]
    assert preflight.split("fi\n", 1)[0].rstrip().endswith(f"exit {EXIT_PREFLIGHT}")


def test_entry_points_take_their_statuses_from_errors_py():
    """No entry point spells an exit status as a number: each comes from errors.py (0 and a
    checker's "problems found" 1 aside), and each one-line error goes through report()."""
    literal = set(_statuses().values()) - {0}
    for rel in ENTRY_POINTS:
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            value = None
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                value = node.value.value
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "exit"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                value = node.args[0].value
            assert value not in literal, f"{rel}:{node.lineno}: exit status {value} as a number"
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "report" in names or rel == "launch/env.py", f"{rel} does not use errors.report"
