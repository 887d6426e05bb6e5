"""GPU benchmark (issue #12): the project's 1b training against the fixed plain-PyTorch
reference on the same GPU, in one run, plus the async checkpoint stall and the start-up time.

    python benchmarks/bench_gpu.py --data SHARDS --peer ../shared/gpu/peer_gpt.py

1. Ours: `python -m pretrain.train` with configs/pretrain_1b.yaml at TP1 PP1 DP1, ZeRO-1,
   bf16, micro-batch 8, global batch 16, seq 2048, `model.compile` as given (default on), async
   checkpoints every `--save-every` steps. Reports the median tokens/s of the steps that
   neither compile (the first `--warmup`) nor follow a save, the seconds from launch to the
   first finished step, and for each save its stall: the time the loop spent in the save
   call (`save_stall_s`) plus how much longer than the median the next step took.
2. The reference, unchanged: `python PEER --compile --micro 8 --accum 2` (its JSON line).
3. The ratio of the two medians.

Every result is one JSON line on stdout (and in OUT/results.jsonl); the logs stay in OUT.
`--config configs/smoke.yaml --no-peer --set model.hidden_size=...` runs the same path
on a CPU with a tiny model (how the script itself is tested).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pretrain.run_dir import RunDir  # noqa: E402 - the run directory's file names, no torch

LAYOUT_1B = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
             "parallel.sequence_parallel=false", "parallel.zero_stage=1",
             "parallel.precision=bf16", "train.micro_batch_size=8",
             "train.global_batch_size=16", "train.seq_length=2048", "train.eval_interval=0"]


def _emit(out: Path, result: dict) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


def run_ours(args, out: Path) -> dict:
    run_dir = out / "run"
    overrides = ([] if args.no_layout else LAYOUT_1B) + [
        f"run.dir={run_dir}", f"train.steps={args.steps}", "train.log_interval=1",
        f"model.compile={args.compile}", "checkpoint.async_save=on",
        f"checkpoint.interval={args.save_every}", "checkpoint.keep_last=1",
        "checkpoint.save_on_stop=false", *([f"data.train={args.data}"] if args.data else []),
        *args.set]
    metrics = RunDir(run_dir).metrics
    log_path = out / "ours.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    first_step_s = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", "--config", args.config,
                                 *overrides], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first_step_s is None and metrics.exists() and metrics.stat().st_size > 0:
                first_step_s = time.perf_counter() - started
            time.sleep(0.1)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"bench_gpu: training exited {proc.returncode}; {log_path}:\n{tail}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    after_save = {r["step"] for r in records if "save_stall_s" in r}
    steady = [r for r in records if r["step"] > args.warmup and r["step"] not in after_save]
    if not steady:
        raise SystemExit(f"bench_gpu: no steady steps; raise --steps above --warmup={args.warmup}")
    median_step = statistics.median(r["step_time_s"] for r in steady)
    stalls = [{"after_step": r["step"] - 1, "save_call_s": r["save_stall_s"],
               "next_step_extra_s": r["step_time_s"] - median_step,
               "stall_s": r["save_stall_s"] + max(0.0, r["step_time_s"] - median_step)}
              for r in records if "save_stall_s" in r]
    return {"what": "ours", "compile": args.compile, "steps": len(records),
            "step_s_median": median_step,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r.get("mfu", 0.0) for r in steady),
            "memory_allocated_gib": max(r.get("memory_allocated_gib", 0.0) for r in records),
            "first_step_after_s": first_step_s,
            "first_step_time_s": records[0]["step_time_s"], "saves": stalls}


def run_peer(args, out: Path) -> dict:
    cmd = [sys.executable, str(args.peer), "--compile", "--micro", "8", "--accum", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / "peer.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"bench_gpu: {args.peer} exited {done.returncode}; see {out / 'peer.log'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"what": "peer_gpt --compile", **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shard directory (data.train); default: the config's")
    parser.add_argument("--peer", type=Path, default=REPO.parent / "shared" / "gpu" / "peer_gpt.py")
    parser.add_argument("--no-peer", action="store_true", help="skip the reference (CPU dry run)")
    parser.add_argument("--config", default="configs/pretrain_1b.yaml")
    parser.add_argument("--no-layout", action="store_true",
                        help="keep the config's layout and batch (CPU dry run)")
    parser.add_argument("--compile", default="on", choices=["on", "off", "auto"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_gpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    import torch

    _emit(args.out, {"what": "machine", "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None})
    ours = run_ours(args, args.out)
    _emit(args.out, ours)
    if args.no_peer:
        return 0
    peer = run_peer(args, args.out)
    _emit(args.out, peer)
    _emit(args.out, {"what": "ratio", "ours_over_peer": ours["tokens_per_s"] / peer["tokens_per_s"],
                     "target": 1.05})
    return 0


if __name__ == "__main__":
    sys.exit(main())
