"""`pretrain.plan` with numbers a careless user types: zero, negative, NaN or infinite budgets
and shapes ended in a ZeroDivisionError, a complex-number TypeError, a ValueError, or a plan
for a model of 0 parameters; a fitted law with a negative or NaN constant still gave a plan.
Each is now one `plan error:` line and exit 2, and nothing is written."""

from __future__ import annotations

import pytest
import yaml

from pretrain.plan.__main__ import main


@pytest.mark.parametrize("args", [
    ["--gpus", "0", "--days", "1"], ["--gpus", "-8", "--days", "1"],
    ["--days", "nan"], ["--days", "inf"], ["--days", "-1"],
    ["--flops", "nan"], ["--flops", "0"], ["--flops", "inf"],
    ["--flops", "1e21", "--params", "0"], ["--flops", "1e21", "--tokens", "-5"],
    ["--days", "1", "--params", "nan"], ["--days", "1", "--vocab", "0"],
    ["--days", "1", "--seq-length", "0"], ["--days", "1", "--gpu-memory", "0"],
])
def test_budget_refuses_numbers_that_are_not_positive_and_finite(args, tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    assert main(["budget", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plan error: --") and err.count("\n") == 1, err
    assert "must be a positive finite number" in err and not out.exists()


@pytest.mark.parametrize("law, named", [
    ({"E": 1.7, "A": -400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}, "A=-400"),
    ({"E": 1.7, "A": 400.0, "B": 410.0, "alpha": float("nan"), "beta": 0.28}, "alpha=nan"),
    ({"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.0}, "beta=0"),
    ({"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34}, "needs numbers"),
])
def test_budget_refuses_an_unusable_law(law, named, tmp_path, capsys):
    path, out = tmp_path / "law.yaml", tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(law))
    assert main(["budget", "--days", "1", "--law", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plan error: --law ") and err.count("\n") == 1 and named in err, err
    assert not out.exists()


def test_ladder_refuses_a_zero_size(tmp_path, capsys):
    assert main(["ladder", "--data", "d", "--vocab", "0", "--output-dir", str(tmp_path / "l")]) == 2
    assert capsys.readouterr().err == "plan error: --vocab 0: must be a positive finite number\n"
    assert not (tmp_path / "l").exists()
