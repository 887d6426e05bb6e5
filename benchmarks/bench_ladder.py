"""Benchmark (not CI): a real scaling ladder on the CPU on the embedded corpus, fitted on all
but the largest size, predicting the largest size's final validation losses.

    PYTHONPATH=. python benchmarks/bench_ladder.py --out runs/bench_ladder

Runs every config `python -m pretrain.plan ladder` would write (WSD main runs, then their
decay branches), one process each, then fits L(N, D) on the smaller sizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.data.embedded import BYTE_VOCAB_SIZE  # noqa: E402
from pretrain.plan.ladder import ladder_configs, write_ladder  # noqa: E402
from pretrain.run_dir import LATEST, RunDir  # noqa: E402
from pretrain.plan.law import fit_law  # noqa: E402
from pretrain.plan.runs import read_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ladder")
    parser.add_argument("--sizes", type=int, default=5)
    parser.add_argument("--min-params", type=float, default=5e5)
    parser.add_argument("--max-params", type=float, default=4e6)
    parser.add_argument("--multiples", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    mains, branches = ladder_configs(args.sizes, args.min_params, args.max_params,
                                     args.multiples, BYTE_VOCAB_SIZE, args.seq_length,
                                     args.global_batch, "embedded", args.out, args.lr)
    for cfg in mains + branches:  # one CPU process each: no ZeRO engine partitioning to do
        cfg["checkpoint"]["async_save"] = "off"
        cfg["train"]["eval_batches"] = 16
    configs = [p for p in write_ladder(mains, branches, args.out, gpus=1) if p.suffix == ".yaml"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for path in configs:
        run_dir = args.out / "runs" / path.stem
        run = RunDir(run_dir)
        if (run.checkpoints / LATEST).exists() and any(
                '"val_loss"' in line for line in run.metrics.read_text().splitlines()):
            continue  # finished earlier: the benchmark resumes where it stopped
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(path)],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"{path.stem}: {time.perf_counter() - started:.0f} s", flush=True)

    runs = [read_run(args.out / "runs" / p.stem) for p in configs]
    largest = max(r.params for r in runs)
    train = [r for r in runs if r.params < largest]
    law = fit_law([r.params for r in train], [r.tokens for r in train],
                  [r.val_loss for r in train], source=f"fitted on {len(train)} runs")
    print(f"L(N, D) = {law.E:.4f} + {law.A:.4g}/N^{law.alpha:.4f} + {law.B:.4g}/D^{law.beta:.4f}"
          f" (fit on {len(train)} runs of the {args.sizes - 1} smaller sizes)")
    print("| run | N | D | measured val_loss | predicted | error |")
    print("| --- | --- | --- | --- | --- | --- |")
    errors = []
    for run in sorted(runs, key=lambda r: (r.params, r.tokens)):
        predicted = law.loss(run.params, run.tokens)
        held_out = run.params == largest
        if held_out:
            errors.append(predicted / run.val_loss - 1)
        print(f"| {run.path.name}{' (held out)' if held_out else ''} | {run.params:.3g} | "
              f"{run.tokens:.3g} | {run.val_loss:.4f} | {predicted:.4f} | "
              f"{100 * (predicted / run.val_loss - 1):+.2f}% |")
    print(f"held-out largest size: mean |error| {100 * np.mean(np.abs(errors)):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
