"""Checkpoint save/load time and bytes against plain torch.save/torch.load of the same
tensors, measured in one process and one run.

    python benchmarks/bench_checkpoint.py [--preset 125m] [--repeats 3] [--dir /tmp/bench_ckpt]

Builds the model with the training CLI's own `build()` (one rank, fp32 on CPU, ZeRO-1),
trains one step so Adam's state exists, then times:

(a) Checkpointer.save: sharded torch_dist files + sha256 of every file + fsync + atomic
    publish (the full protocol of docs/checkpoints.md);
(b) torch.save of a dict holding the same tensors (weights, exp_avg, exp_avg_sq), then fsync;
(c) Checkpointer load (verify sha256 + read + install into the model, optimizer and loader);
(d) torch.load(weights_only=True) of (b)'s file + copy into the model parameters.

Prints a table; the minimum over --repeats is reported for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/bench_ckpt")
    args = parser.parse_args(argv)

    from pretrain.checkpoint.manager import Checkpointer
    from pretrain.checkpoint.parts import training_parts
    from pretrain.checkpoint.tensor_parts import tensor_parts
    from pretrain.config import load_config, validate
    from pretrain.data.build import open_data
    from pretrain.log import quiet_library_warnings
    from pretrain.parallel import dist as pdist
    from pretrain.train import build

    quiet_library_warnings()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"model.preset={args.preset}", f"run.dir={root / 'run'}", "train.steps=1",
        "train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=1",
        "optim.warmup_steps=0", "train.log_interval=1"])
    data = open_data(cfg)
    layout = validate(cfg, world_size=1, vocab_size=data.vocab_size)
    built = build(cfg, layout, data, pdist.detect_env(), bf16=False)
    built.trainer.fit()  # one step: Adam state exists
    ckpt = built.trainer.checkpointer
    params = [p for chunk in built.chunks for p in chunk.parameters()]
    n_params = sum(p.numel() for p in params)

    save_s, tsave_s, load_s, tload_s = [], [], [], []
    ours_bytes = torch_bytes = 0
    for rep in range(args.repeats):
        started = time.perf_counter()
        path = ckpt.save(100 + rep)
        save_s.append(time.perf_counter() - started)
        ours_bytes = _du(path)

        states = ckpt.tensors["optimizer"].opt.gather()
        blob = {"model": {f"p{i}": p.detach() for i, p in enumerate(params)},
                "exp_avg": {f"p{i}": states[p]["exp_avg"] for i, p in enumerate(params)},
                "exp_avg_sq": {f"p{i}": states[p]["exp_avg_sq"] for i, p in enumerate(params)}}
        target = root / f"plain_{rep}.pt"
        started = time.perf_counter()
        with open(target, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        tsave_s.append(time.perf_counter() - started)
        torch_bytes = target.stat().st_size

        fresh = Checkpointer(cfg, layout, data, built.device,
                             training_parts(built.scheduler, built.loader, built.trainer.state),
                             tensor_parts(cfg, layout, built.zero.engine, built.chunks))
        started = time.perf_counter()
        loaded = fresh.load()
        load_s.append(time.perf_counter() - started)
        assert loaded is not None and loaded.step == 100 + rep

        started = time.perf_counter()
        back = torch.load(target, weights_only=True)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(back["model"][f"p{i}"])
        tload_s.append(time.perf_counter() - started)
        del back, blob, states

    def row(name, secs, nbytes):
        best = min(secs)
        print(f"| {name} | {best:.2f} | {nbytes / 2**20:,.1f} | {nbytes / 2**20 / best:,.0f} |")

    print(f"\n{args.preset}: {n_params:,} parameters, fp32, ZeRO-1 on 1 rank, CPU; "
          f"min of {args.repeats}\n")
    print("| operation | seconds | MiB | MiB/s |")
    print("| --- | --- | --- | --- |")
    row("save: Checkpointer (sharded + sha256 + fsync + publish)", save_s, ours_bytes)
    row("save: torch.save of the same tensors + fsync", tsave_s, torch_bytes)
    row("load: Checkpointer (sha256 verify + read + install)", load_s, ours_bytes)
    row("load: torch.load(weights_only) + copy into params", tload_s, torch_bytes)
    print(f"\nsave ratio ours/torch = {min(save_s) / min(tsave_s):.2f}, "
          f"load ratio = {min(load_s) / min(tload_s):.2f}, "
          f"bytes ratio = {ours_bytes / torch_bytes:.3f}")
    built.loader.close()
    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
