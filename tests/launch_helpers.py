"""Run the real training CLI as a subprocess (one process or torchrun ranks over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(target: list[str], nproc: int, timeout: int, what: str) -> subprocess.CompletedProcess:
    """Run `python TARGET...` (nproc=1) or torchrun over it; raise with the output on failure.

    Launcher variables of an enclosing job are dropped so the child starts its own world. A
    new session lets a timeout kill the launcher *and* its ranks, never leaving orphans.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        # --standalone: a local rendezvous on a free port, so parallel test runs don't collide.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), *target]
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{what} timed out after {timeout}s: {' '.join(cmd)}\n"
                                 f"--- stderr ---\n{stderr[-8000:]}") from None
    if popen.returncode != 0:
        raise AssertionError(f"{what} failed ({popen.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


def run_training(run_dir: Path, overrides: list[str], nproc: int = 1,
                 config: str = "configs/smoke.yaml", timeout: int = 300) -> subprocess.CompletedProcess:
    args = ["--config", config, f"run.dir={run_dir}", *overrides]
    return launch(["-m", "pretrain.train", *args], nproc, timeout, "training")


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
