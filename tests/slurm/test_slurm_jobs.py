"""The unchanged slurm/*.sh scripts under a real SLURM controller (single node, CPU).

- pretrain_1b.sh with the smoke config on 1 node x 2 tasks: SIGUSR1 to the batch shell
  mid-run (`scancel --batch --signal=USR1`, what `--signal=B:USR1@T` does) -> every rank
  checkpoints and exits 75 -> the script requeues -> the requeued job resumes and finishes
  with the uninterrupted run's final loss, bit for bit.
- preflight: a layout that does not fit the allocation, a missing data directory, a
  MASTER_ADDR that is not node 0's, a run directory of another run: each fails before
  training starts, with its message, and is not requeued.
- shard.sh: a Ray cluster over the allocation shards a small corpus, pretrain_1b.sh trains on
  the result; a failing shard job still leaves no Ray process behind.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch_helpers import read_metrics

pytestmark = pytest.mark.slurm

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=15"]


def _smoke_env(run_dir: Path, overrides: str = "", **extra) -> dict:
    return {"CONFIG": "configs/smoke.yaml", "RUN_DIR": str(run_dir), "OVERRIDES": overrides,
            "RANK_EXIT_GRACE": "30", "PREFLIGHT_TIMEOUT": "30", **extra}


def _wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(json.loads(line)["step"] >= step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.3)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout:.0f}s")


def _logs(run_dir: Path, job: int, restart: int) -> dict[str, str]:
    prefix = f"job{job}.restart{restart}."
    return {p.name[len(prefix):]: p.read_text() for p in (run_dir / "logs").glob(prefix + "*")}


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    overrides = "train.steps=300 train.log_interval=1"
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    job_a = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=_smoke_env(plain, overrides),
                         output=tmp_path / "a.out")
    job_b = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=_smoke_env(preempted, overrides),
                         output=tmp_path / "b.out")
    _wait_for_step(preempted, 5)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_b))
    # The requeued job starts again once its old credential expired (cred_expire, 10 s in
    # the test cluster; SLURM's default is 120 s).
    info_b = slurm.wait(job_b, DONE, timeout=300)
    info_a = slurm.wait(job_a, DONE, timeout=300)
    assert info_a["JobState"] == "COMPLETED", (tmp_path / "a.out").read_text()
    assert info_b["JobState"] == "COMPLETED" and info_b["Restarts"] == "1", \
        (tmp_path / "b.out").read_text()

    first, second = _logs(preempted, job_b, 0), _logs(preempted, job_b, 1)
    assert "got SIGUSR1; forwarding to the ranks" in first["driver.log"]
    assert "training exited with status 75" in first["driver.log"]
    assert "checkpointed on a stop signal; requeueing" in first["driver.log"]
    stopped = int(first["rank0.log"].split("stopped by a signal after step ")[1].split(";")[0])
    assert f"resumed from {preempted / 'checkpoints' / f'step_{stopped:08d}'}" in second["rank0.log"]
    assert "run finished" in second["driver.log"]

    steps = [r["step"] for r in read_metrics(preempted)]
    assert steps == list(range(1, 301))
    assert read_metrics(preempted)[-1]["loss"] == read_metrics(plain)[-1]["loss"]
    assert [r["loss"] for r in read_metrics(preempted)] == [r["loss"] for r in read_metrics(plain)]


def test_preflight_fails_fast_without_requeue(slurm, tmp_path):
    other = tmp_path / "other"  # a run directory that belongs to a different model
    other.mkdir()
    subprocess.run([".venv/bin/python", "-c", (
        "from pretrain.config import load_config, save_config;"
        f"save_config(load_config('configs/smoke.yaml', ['model.hidden_size=128']), '{other}/config.yaml')")],
        cwd=Path(__file__).resolve().parents[2], check=True)
    cases = {
        "layout": (_smoke_env(tmp_path / "layout", "parallel.tensor_parallel=4"),
                   "world size 2 is not divisible by tensor_parallel x pipeline_parallel"),
        "data": (_smoke_env(tmp_path / "data", f"data.train={tmp_path / 'no_such_shards'}"),
                 "data error:"),
        "master": (_smoke_env(tmp_path / "master", MASTER_ADDR="203.0.113.7"),
                   "MASTER_ADDR=203.0.113.7 (203.0.113.7) is not an address of node 0"),
        "owner": (_smoke_env(other), "belongs to another run: its config.yaml has model.hidden_size=128"),
    }
    jobs = {name: slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=env,
                               output=tmp_path / f"{name}.out")
            for name, (env, _) in cases.items()}
    for name, job in jobs.items():
        info = slurm.wait(job, DONE, timeout=240)
        out = (tmp_path / f"{name}.out").read_text()
        run_dir = Path(cases[name][0]["RUN_DIR"])
        driver = (run_dir / "logs" / f"job{job}.restart0.driver.log").read_text()
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (name, info, out)
        assert cases[name][1] in driver + out, (name, driver[-2000:])
        assert "preflight failed" in out
        assert not list((run_dir / "logs").glob("*.rank*.log")), f"{name}: training started"


def test_shard_script_then_training(slurm, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    python = str(repo / ".venv" / "bin" / "python")
    corpus = tmp_path / "corpus.jsonl"
    subprocess.run([python, "data_tools/export_embedded_corpus.py", "--output", str(corpus)],
                   cwd=repo, check=True, capture_output=True)
    lines = corpus.read_text().splitlines()[:40]
    corpus.write_text("\n".join(lines) + "\n")
    subprocess.run([python, "data_tools/train_tokenizer.py", "--input", str(corpus),
                    "--vocab-size", "512", "--output", str(tmp_path / "tok")],
                   cwd=repo, check=True, capture_output=True)
    shards = tmp_path / "shards"
    shard_env = {"INPUT": str(corpus), "OUTPUT": str(shards), "TOKENIZER": str(tmp_path / "tok.model"),
                 "SEQ_LEN": "32", "SHARD_ARGS": "--val-fraction 0.1"}
    job = slurm.sbatch("slurm/shard.sh", "--nodes=1", "--time=10", env=shard_env,
                       output=tmp_path / "shard.out")
    info = slurm.wait(job, DONE, timeout=300)
    out = (tmp_path / "shard.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert "Ray cluster up: 1 node(s)" in out and "stopping Ray" in out
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 0

    # A failing shard job (no such tokenizer) still stops its Ray processes.
    bad = slurm.sbatch("slurm/shard.sh", "--nodes=1", "--time=10",
                       env={**shard_env, "TOKENIZER": str(tmp_path / "missing.model"),
                            "OUTPUT": str(tmp_path / "bad")}, output=tmp_path / "bad.out")
    info = slurm.wait(bad, DONE, timeout=300)
    assert info["JobState"] == "FAILED", (tmp_path / "bad.out").read_text()
    assert "missing.model: no such file" in (tmp_path / "bad.out").read_text()
    leftovers = subprocess.run(["pgrep", "-f", f"/tmp/ray-{bad}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "Ray processes left behind"

    run_dir = tmp_path / "train"
    train = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=_smoke_env(
        run_dir, f"data.train={shards} train.steps=3 train.global_batch_size=4 "
                 f"train.micro_batch_size=2 optim.warmup_steps=1"), output=tmp_path / "train.out")
    info = slurm.wait(train, DONE, timeout=300)
    assert info["JobState"] == "COMPLETED", (tmp_path / "train.out").read_text()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
