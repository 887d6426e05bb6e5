"""An --output that cannot be written was found only after the work was done (`pretrain.evaluate`
scored every batch, then failed with a traceback). It is now checked first: one line, exit 2,
before any checkpoint is read."""

from __future__ import annotations

import os

import pytest

from pretrain.evaluate import main as evaluate
from pretrain.files import unwritable


@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "missing" / "out.json", "is not a directory; create it first"),
    (lambda d: (d / "file").write_text("") or d / "file" / "out.json", "is not a directory"),
    (lambda d: (d / "sub").mkdir() or d / "sub", "is a directory; name a file"),
    (lambda d: os.symlink(d / "elsewhere", d / "link") or d / "link", "is a symlink; name a file"),
])
def test_an_unwritable_output_is_named_before_any_work(tmp_path, capsys, make, reason):
    out = make(tmp_path)
    assert reason in unwritable(out)
    # The checkpoint does not even exist: the output is checked before it is looked for.
    assert evaluate([str(tmp_path / "no-run"), "--data", "embedded", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: --output {out}: ") and err.count("\n") == 1, err
    assert reason in err and not (tmp_path / "elsewhere").exists()


def test_a_writable_output_passes(tmp_path):
    assert unwritable(tmp_path / "out.json") is None


@pytest.mark.parametrize("make, reason", [
    (lambda d: os.symlink(d / "elsewhere", d / "out") or d / "out", "is a symlink"),
    (lambda d: d / "missing" / "out", "missing is not a directory; create it first"),
    (lambda d: (d / "out").mkdir() or (d / "out" / "x").write_text("") or d / "out",
     "exists and is not an empty directory"),
])
def test_export_refuses_an_output_it_cannot_publish_before_reading_anything(tmp_path, capsys,
                                                                            make, reason):
    from pretrain.export_hf import main as export

    out = make(tmp_path)
    assert export([str(tmp_path / "no-run"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export error: --output {out}: ") and reason in err, err
    assert err.count("\n") == 1 and not (tmp_path / "elsewhere").exists()
