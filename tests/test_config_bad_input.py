"""Careless config input that used to be accepted or end in a traceback: NaN/inf numbers and
blend weights, an empty YAML file, and a run.dir that is a file or not writable."""

from __future__ import annotations

import pytest

from pretrain.config import check_run_dir, load_config
from tests.test_config import SMOKE, _error


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=nan", "optim.lr='nan' must be a finite number"),
    ("optim.grad_clip=.inf", "optim.grad_clip=inf must be a finite number"),
    ("optim.weight_decay=-inf", "optim.weight_decay='-inf' must be a finite number"),
    ("data.train=[{path: a, weight: .nan}, {path: b, weight: 1}]",
     "weight nan of 'a' must be a positive finite number"),
    ("data.train=[{path: a, weight: .inf}]", "weight inf of 'a' must be a positive finite number"),
])
def test_non_finite_numbers_are_refused(override, needle):
    assert needle in _error(load_config, SMOKE, [override])


def test_empty_yaml_is_refused(tmp_path):
    for text in ("", "# nothing here\n", "---\n"):
        (tmp_path / "empty.yaml").write_text(text)
        assert "empty.yaml is empty; give at least run.dir" in _error(load_config, tmp_path / "empty.yaml")


def test_run_dir_that_is_a_file_or_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = load_config(SMOKE, [f"run.dir={tmp_path / 'file' / 'run'}"])
    assert "file is a file, not a directory" in _error(check_run_dir, cfg)
    cfg = load_config(SMOKE, ["run.dir=/proc/sys/pretrain-run"])  # not writable, even for root
    assert "/proc/sys is not writable" in _error(check_run_dir, cfg)
    cfg = load_config(SMOKE, [f"run.dir={tmp_path / 'new' / 'run'}"])
    check_run_dir(cfg)
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.slow
def test_cli_run_dir_file_exits_2_with_one_line(tmp_path):
    from tests.launch_helpers import run_training

    (tmp_path / "file").write_text("")
    out = run_training(tmp_path / "file", ["train.steps=2"], expect_rc=2, timeout=120)
    assert out.stderr.startswith("config error: run.dir=") and out.stderr.count("\n") == 1, out.stderr
