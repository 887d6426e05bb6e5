"""Training curves as one PNG: `python -m pretrain.plot RUN [RUN ...] -o curves.png`.

Reads each run directory's metrics.jsonl and overlays the runs, named by their directory:
training and validation loss against tokens, learning rate, gradient norm, throughput and
MFU, and validation bits-per-byte when the runs report it. Exit 2 with one line when a run
has no metrics; a torn last line (a run killed mid-write) is skipped with a notice.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from pretrain.errors import PlotError, UserError, report
from pretrain.files import write_atomic
from pretrain.run_dir import METRICS, RunDir

def read_metrics(run: Path) -> list[dict]:
    """The step records of RUN/metrics.jsonl (or of that file given directly), with every
    plotted value that is not a finite number left out. What was skipped is said in at most
    two notice lines: one for lines that are not step records (the last one alone is a run
    still writing), one for the values left out (a NaN loss of a skipped update, a string)."""
    path = RunDir(run).metrics if run.is_dir() else run
    if not path.is_file():
        raise PlotError(f"{run}: no {METRICS} here; pass a run directory (run.dir) of a "
                        f"training run that logged at least one step")
    records, bad_lines, lines = [], [], path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and _finite(record.get("step")):
            records.append(record)
        else:
            bad_lines.append(number)
    if not records:
        raise PlotError(f"{path}: no step records; the run has not logged a step yet")
    if bad_lines == [len(lines)]:
        print(f"notice: {path}: the last line is incomplete; plotting the records before it",
              file=sys.stderr)
    elif bad_lines:
        print(f"notice: {path}: {len(bad_lines)} line(s) are not step records (line "
              f"{_some(bad_lines)}); plotting the {len(records)} that are", file=sys.stderr)
    left_out: dict[str, list] = {}
    for record in records:
        for key in PLOTTED & record.keys():
            if not _finite(record[key]):
                left_out.setdefault(key, []).append(record["step"])
                del record[key]
    if left_out:
        print(f"notice: {path}: values that are not finite numbers left out: "
              + "; ".join(f"{key} at step {_some(steps)}" for key, steps in sorted(left_out.items())),
              file=sys.stderr)
    return records


def _finite(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _some(items: list, shown: int = 3) -> str:
    return ", ".join(str(i) for i in items[:shown]) + (f", ... ({len(items)})"
                                                       if len(items) > shown else "")


def run_names(runs: list[Path]) -> list[str]:
    names = [run.resolve().name if run.is_dir() else run.resolve().parent.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


# (title, x key, [(y key, line style, label suffix)], y log scale)
PANELS = (
    ("loss", "tokens", [("loss", "-", "train"), ("val_loss", "o--", "val")], False),
    ("learning rate", "step", [("lr", "-", "")], False),
    ("gradient norm", "step", [("grad_norm", "-", "")], True),
    ("throughput (tokens/s)", "step", [("tokens_per_s", "-", "")], False),
    ("MFU", "step", [("mfu", "-", "")], False),
    ("validation bits per byte", "tokens", [("val_bpb", "o-", "")], False),
)
PLOTTED = {key for _, x_key, series, _ in PANELS for key in (x_key, *(y for y, _, _ in series))}


def plot(runs: list[Path], output: Path) -> list[str]:
    """Render the PNG; returns the panels drawn (those some run has data for)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    data = [(name, read_metrics(run)) for name, run in zip(run_names(runs), runs)]
    panels = [p for p in PANELS
              if any(y in r for _, records in data for r in records for y, _, _ in p[2])]
    columns = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, x_key, series, log_y) in zip(axes.flat, panels):
        for i, (name, records) in enumerate(data):
            for y_key, style, suffix in series:
                points = [(r[x_key], r[y_key]) for r in records if y_key in r and x_key in r]
                if points:
                    xs, ys = zip(*points)
                    label = f"{name} {suffix}".strip() if len(series) > 1 or len(data) > 1 else None
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], label=label,
                            markersize=3, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel(x_key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_atomic(output, image.getvalue())
    return [p[0] for p in panels]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"),
                        help="PNG to write (default: curves.png)")
    args = parser.parse_args(argv)
    try:
        drawn = plot(args.runs, args.output)
    except UserError as err:
        return report(err)
    print(f"plot: {len(args.runs)} run(s), {', '.join(drawn)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
