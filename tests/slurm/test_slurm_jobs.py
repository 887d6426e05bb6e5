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
from pathlib import Path

import pytest

from tests.launch_helpers import read_metrics
from tests.slurm.jobs import CPU_JOB, DONE, job_logs, small_corpus, smoke_env, wait_for_step

pytestmark = pytest.mark.slurm


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    overrides = "train.steps=150 train.log_interval=1"  # the USR1 lands near step 5
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    job_a = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=smoke_env(plain, overrides),
                         output=tmp_path / "a.out")
    job_b = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=smoke_env(preempted, overrides),
                         output=tmp_path / "b.out")
    wait_for_step(preempted, 5)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_b))
    # The requeued job starts again once its old credential expired (cred_expire, 10 s in
    # the test cluster; SLURM's default is 120 s).
    info_b = slurm.wait(job_b, DONE, timeout=300)
    info_a = slurm.wait(job_a, DONE, timeout=300)
    assert info_a["JobState"] == "COMPLETED", (tmp_path / "a.out").read_text()
    assert info_b["JobState"] == "COMPLETED" and info_b["Restarts"] == "1", \
        (tmp_path / "b.out").read_text()

    first, second = job_logs(preempted, job_b, 0), job_logs(preempted, job_b, 1)
    assert "got SIGUSR1; forwarding to the ranks" in first["driver.log"]
    assert "training exited with status 75" in first["driver.log"]
    assert "checkpointed on a stop signal; requeueing" in first["driver.log"]
    stopped = int(first["rank0.log"].split("stopped by a signal after step ")[1].split(";")[0])
    assert f"resumed from {preempted / 'checkpoints' / f'step_{stopped:08d}'}" in second["rank0.log"]
    assert "run finished" in second["driver.log"]

    steps = [r["step"] for r in read_metrics(preempted)]
    assert steps == list(range(1, 151))
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
        "layout": (smoke_env(tmp_path / "layout", "parallel.tensor_parallel=4"),
                   "world size 2 is not divisible by tensor_parallel x pipeline_parallel"),
        "data": (smoke_env(tmp_path / "data", f"data.train={tmp_path / 'no_such_shards'}"),
                 "data error:"),
        "master": (smoke_env(tmp_path / "master", MASTER_ADDR="203.0.113.7"),
                   "MASTER_ADDR=203.0.113.7 (203.0.113.7) is not an address of node 0"),
        "owner": (smoke_env(other), "belongs to another run: its config.yaml has model.hidden_size=128"),
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
    corpus, tokenizer = small_corpus(tmp_path)
    shards = tmp_path / "shards"
    shard_env = {"INPUT": str(corpus), "OUTPUT": str(shards), "TOKENIZER": str(tokenizer),
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
    train = slurm.sbatch("slurm/pretrain_1b.sh", *CPU_JOB, env=smoke_env(
        run_dir, f"data.train={shards} train.steps=3 train.global_batch_size=4 "
                 f"train.micro_batch_size=2 optim.warmup_steps=1"), output=tmp_path / "train.out")
    info = slurm.wait(train, DONE, timeout=300)
    assert info["JobState"] == "COMPLETED", (tmp_path / "train.out").read_text()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
