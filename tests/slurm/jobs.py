"""What the SLURM tests share: job flags, the smoke run's environment for pretrain_1b.sh, and
waiting on a run's metrics and reading its per-job logs; a tiny corpus for shard.sh."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=15"]


def smoke_env(run_dir: Path, overrides: str = "", **extra) -> dict:
    return {"CONFIG": "configs/smoke.yaml", "RUN_DIR": str(run_dir), "OVERRIDES": overrides,
            "RANK_EXIT_GRACE": "30", "PREFLIGHT_TIMEOUT": "30", **extra}


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(json.loads(line)["step"] >= step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.3)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout:.0f}s")


def job_logs(run_dir: Path, job: int, restart: int) -> dict[str, str]:
    prefix = f"job{job}.restart{restart}."
    return {p.name[len(prefix):]: p.read_text() for p in (run_dir / "logs").glob(prefix + "*")}


def small_corpus(where: Path) -> tuple[Path, Path]:
    """40 documents of the embedded corpus and a 512-token tokenizer: (corpus, tokenizer)."""
    python = str(REPO / ".venv" / "bin" / "python")
    corpus = where / "corpus.jsonl"
    subprocess.run([python, "data_tools/export_embedded_corpus.py", "--output", str(corpus)],
                   cwd=REPO, check=True, capture_output=True)
    lines = corpus.read_text().splitlines()[:40]
    corpus.write_text("\n".join(lines) + "\n")
    subprocess.run([python, "data_tools/train_tokenizer.py", "--input", str(corpus),
                    "--vocab-size", "512", "--output", str(where / "tok")],
                   cwd=REPO, check=True, capture_output=True)
    return corpus, where / "tok.model"
