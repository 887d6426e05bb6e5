"""`pretrain.plot` on metrics that are not what a run writes: lines of garbage gave a notice
each (tens of lines), and string or NaN losses were plotted silently. Now at most one notice
for the lines and one for the values left out, and the plotted curves hold only finite
numbers."""

from __future__ import annotations

import json

from pretrain.plot import main, read_metrics


def _metrics(path, garbage: int):
    lines = ["garbage {"] * garbage + [
        json.dumps({"step": 1, "tokens": 64, "loss": "abc", "lr": 1e-3}),
        json.dumps({"step": 2, "tokens": 128, "loss": float("nan"), "lr": 1e-3}),
        "[1, 2, 3]",
        json.dumps({"step": "x", "loss": 1.0}),
        json.dumps({"step": 3, "tokens": 192, "loss": 3.0, "grad_norm": float("inf")}),
    ]
    path.mkdir()
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_garbage_lines_and_values_are_two_notices_and_left_out(tmp_path, capsys):
    run = _metrics(tmp_path / "run", garbage=30)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r.get("loss") for r in records] == [None, None, 3.0]
    assert "grad_norm" not in records[2] and records[0]["lr"] == 1e-3
    notices = capsys.readouterr().err.splitlines()
    assert notices == [
        f"notice: {run}/metrics.jsonl: 32 line(s) are not step records (line 1, 2, 3, ... (32)); "
        f"plotting the 3 that are",
        f"notice: {run}/metrics.jsonl: values that are not finite numbers left out: grad_norm at "
        f"step 3; loss at step 1, 2"]


def test_plot_of_garbage_metrics_still_draws_the_good_points(tmp_path, capsys):
    run = _metrics(tmp_path / "run", garbage=30)
    assert main([str(run), "-o", str(tmp_path / "c.png")]) == 0
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 2 and (tmp_path / "c.png").stat().st_size > 0
