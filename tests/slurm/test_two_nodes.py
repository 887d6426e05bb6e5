"""The unchanged slurm/*.sh scripts on a real two-node SLURM cluster: node1 and node2 in their
own network namespaces on this machine (tests/slurm/cluster.py), CPU ranks over gloo.

- pretrain_1b.sh, 2 nodes x 2 tasks, TP2 inside a node and DP2 across nodes: MASTER_ADDR is
  node1, ranks 0-1 run on node1 and 2-3 on node2; SIGUSR1 checkpoints, requeues and resumes
  on both nodes; the losses equal the same layout on one node, bit for bit. Then TP2 x PP2,
  the pipeline's stages on different nodes, against one node too.
- preflight across nodes: node2 running other code, and a MASTER_ADDR that node2 cannot
  reach: the job fails fast with the node named, is not requeued, and no rank starts.
- shard.sh: the Ray head on node1 and a worker on node2 write the same bytes as one node; a
  failure on either node (shard.py on node1, Ray on node2) leaves no Ray process on any.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.data_tools.test_shard import output_files
from tests.launch_helpers import read_metrics, run_training
from tests.slurm import cluster
from tests.slurm.jobs import DONE, REPO, job_logs, small_corpus, smoke_env, wait_for_step

pytestmark = pytest.mark.slurm

TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=15"]
STEPS = 40  # the requeue test's run: long enough that its stop signal lands mid-run


def _ranks_by_node(restart: int = 0) -> dict[str, list[int]]:
    """SLURM_PROCID of the training processes running in each node's namespace, of the
    job's `restart`-th start (SLURM_RESTART_COUNT; absent before the first requeue)."""
    placed = {}
    for node in cluster.NODES:
        ranks = []
        for pid, argv in cluster.node_processes(node):
            if argv[1:3] != ["-m", "pretrain.train"] or "--dry-run" in argv:
                continue  # srun, the preflight, the batch shell
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue
            restarts = [int(v.split(b"=")[1]) for v in env if v.startswith(b"SLURM_RESTART_COUNT=")]
            if (restarts[0] if restarts else 0) != restart:
                continue
            ranks += [int(v.split(b"=")[1]) for v in env if v.startswith(b"SLURM_PROCID=")]
        placed[node] = sorted(ranks)
    return placed


def _wait_for_placement(expected: dict, timeout: float = 60, restart: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while (placed := _ranks_by_node(restart)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert placed == expected, f"ranks by node: {placed}, expected {expected}"


def _wait_for_text(path: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path} has no {text!r} after {timeout:.0f}s"
        time.sleep(0.3)


def _ray_processes() -> dict[str, list[str]]:
    return {node: [" ".join(argv)[:120] for _, argv in cluster.node_processes(node)
                   if any("ray" in a.lower() or "gcs_server" in a for a in argv)]
            for node in cluster.NODES}


def _assert_no_ray(after: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any((left := _ray_processes()).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(left.values()), f"Ray processes left behind after {after}: {left}"


def test_tp_in_node_dp_across_nodes_requeues_on_both(slurm_two_nodes, tmp_path):
    slurm = slurm_two_nodes
    overrides = f"parallel.tensor_parallel=2 train.steps={STEPS} train.log_interval=1"
    run_training(tmp_path / "one_node", overrides.split(), nproc=4)
    run_dir = tmp_path / "two_nodes"
    job = slurm.sbatch("slurm/pretrain_1b.sh", *TWO_NODES, env=smoke_env(run_dir, overrides),
                       output=tmp_path / "job.out")
    _wait_for_placement({"node1": [0, 1], "node2": [2, 3]}, timeout=180)
    # Early in the run: a signal that arrives after the last step finds ranks already exiting.
    wait_for_step(run_dir, 2)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    # The requeued job starts again once its old credential expired (cred_expire, 10 s), on
    # the same placement. Watched from the signal on: the restarted ranks may finish their
    # last steps before their log shows the resume.
    _wait_for_placement({"node1": [0, 1], "node2": [2, 3]}, timeout=180, restart=1)
    _wait_for_text(run_dir / "logs" / f"job{job}.restart1.rank0.log", "resumed from")
    info = slurm.wait(job, DONE, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", \
        (tmp_path / "job.out").read_text()
    assert info["NodeList"] == "node[1-2]"

    first, second = job_logs(run_dir, job, 0), job_logs(run_dir, job, 1)
    for logs in (first, second):
        assert "2 node(s), 4 task(s)" in logs["driver.log"]
        assert "master node1:" in logs["driver.log"]
        assert "preflight: 2 node(s) ok" in logs["driver.log"]
        assert sorted(k for k in logs if k.startswith("rank")) == [f"rank{r}.log" for r in range(4)]
    assert "checkpointed on a stop signal; requeueing" in first["driver.log"]
    stopped = int(first["rank0.log"].split("stopped by a signal after step ")[1].split(";")[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in second["rank0.log"]
    assert "run finished" in second["driver.log"]

    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in read_metrics(run_dir)] == \
        [r["loss"] for r in read_metrics(tmp_path / "one_node")]


def test_pipeline_stages_on_different_nodes(slurm_two_nodes, tmp_path):
    overrides = "parallel.tensor_parallel=2 parallel.pipeline_parallel=2 train.steps=8"
    run_training(tmp_path / "one_node", overrides.split(), nproc=4)
    run_dir = tmp_path / "two_nodes"
    job = slurm_two_nodes.sbatch("slurm/pretrain_1b.sh", *TWO_NODES,
                                 env=smoke_env(run_dir, overrides), output=tmp_path / "job.out")
    info = slurm_two_nodes.wait(job, DONE, timeout=300)
    assert info["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()
    # Ranks 0-1 (stage 0) on node1 and 2-3 (stage 1) on node2: every activation and gradient
    # between the stages crossed the bridge.
    assert [r["loss"] for r in read_metrics(run_dir)] == \
        [r["loss"] for r in read_metrics(tmp_path / "one_node")]


def test_preflight_fails_fast_across_nodes(slurm_two_nodes, tmp_path):
    slurm, root = slurm_two_nodes, slurm_two_nodes.root
    # node2 sees another launch/__init__.py at the same path (a stale copy on its local disk):
    # a bind mount in node2's own mount namespace, gone with it.
    stale = tmp_path / "stale_init.py"
    target = REPO / "launch" / "__init__.py"
    stale.write_text(target.read_text() + "# an older checkout\n")
    # node1 also answers on 10.77.1.11, an address node2 has no route to.
    hidden = "10.77.1.11"
    for out in (cluster.on_node(root, "node2", "mount", "--bind", str(stale), str(target)),
                cluster.on_node(root, "node1", "ip", "addr", "add", f"{hidden}/32", "dev", "lo")):
        assert out.returncode == 0, out.stderr
    cases = {
        "code": (smoke_env(tmp_path / "code", PREFLIGHT_TIMEOUT="20"),
                 "node 1 (node2) runs code revision "),
        "unreachable": (smoke_env(tmp_path / "unreachable", MASTER_ADDR=hidden,
                                  PREFLIGHT_TIMEOUT="10"),
                        f"node 1 (node2) cannot reach MASTER_ADDR={hidden}"),
    }
    try:
        jobs = {name: slurm.sbatch("slurm/pretrain_1b.sh", *TWO_NODES, env=env,
                                   output=tmp_path / f"{name}.out")
                for name, (env, _) in cases.items()}
        infos = {name: slurm.wait(job, DONE, timeout=240) for name, job in jobs.items()}
    finally:
        cluster.on_node(root, "node2", "umount", str(target))
        cluster.on_node(root, "node1", "ip", "addr", "del", f"{hidden}/32", "dev", "lo")
    for name, (env, expected) in cases.items():
        out = (tmp_path / f"{name}.out").read_text()
        run_dir = Path(env["RUN_DIR"])
        driver = (run_dir / "logs" / f"job{jobs[name]}.restart0.driver.log").read_text()
        assert infos[name]["JobState"] == "FAILED" and infos[name]["Restarts"] == "0", (name, out)
        assert "preflight failed on the nodes; not requeued" in out, (name, out)
        assert expected in driver, (name, driver[-2000:])
        assert not list((run_dir / "logs").glob("*.rank*.log")), f"{name}: training started"
        assert not (run_dir / "metrics.jsonl").exists()


def test_shard_over_two_nodes(slurm_two_nodes, tmp_path):
    slurm = slurm_two_nodes
    corpus, tokenizer = small_corpus(tmp_path)
    # A home without ~/.ray (as on a machine that never ran Ray): shard.sh once depended on
    # ~/.ray/auth_token, which only an earlier Ray command leaves; now each job makes a token.
    home = tmp_path / "home"
    home.mkdir()
    env = {"INPUT": str(corpus), "TOKENIZER": str(tokenizer), "SEQ_LEN": "32",
           "SHARD_ARGS": "--val-fraction 0.1", "HOME": str(home)}
    # A Ray that cannot start on node2 (a broken environment on one node), for the last job.
    broken_ray = tmp_path / "ray_fails_on_node2"
    broken_ray.write_text('#!/bin/sh\nif [ "$(hostname)" = node2 ]; then\n'
                          '    echo "ray: broken on node2" >&2; exit 1\nfi\n'
                          f'exec {REPO / ".venv" / "bin" / "ray"} "$@"\n')
    broken_ray.chmod(0o755)
    jobs = {
        "two": ("--nodes=2", {**env, "OUTPUT": str(tmp_path / "two")}),
        "one": ("--nodes=1", {**env, "OUTPUT": str(tmp_path / "one")}),
        "fails_on_node1": ("--nodes=2", {**env, "OUTPUT": str(tmp_path / "bad1"),
                                         "TOKENIZER": str(tmp_path / "missing.model")}),
        "fails_on_node2": ("--nodes=2", {**env, "OUTPUT": str(tmp_path / "bad2"),
                                         "RAY": str(broken_ray)}),
    }
    # One after another (shard.sh asks for --exclusive anyway), so that any Ray process left
    # on either node is this job's.
    infos, out = {}, {}
    for name, (nodes, job_env) in jobs.items():
        job = slurm.sbatch("slurm/shard.sh", nodes, "--time=10", env=job_env,
                           output=tmp_path / f"{name}.out")
        infos[name] = slurm.wait(job, DONE, timeout=300)
        out[name] = (tmp_path / f"{name}.out").read_text()
        _assert_no_ray(f"job {name}")

    assert infos["two"]["JobState"] == "COMPLETED", out["two"]
    assert "Ray head on node1 (10.77.0.11:" in out["two"]
    assert "Ray cluster up: 2 node(s)" in out["two"]
    assert infos["one"]["JobState"] == "COMPLETED", out["one"]
    assert output_files(tmp_path / "two") == output_files(tmp_path / "one")

    assert infos["fails_on_node1"]["JobState"] == "FAILED", out["fails_on_node1"]
    assert "Ray cluster up: 2 node(s)" in out["fails_on_node1"]
    assert "missing.model: no such file" in out["fails_on_node1"]
    assert infos["fails_on_node2"]["JobState"] == "FAILED", out["fails_on_node2"]
    assert "a Ray worker on the other nodes exited (status 1) before all 2 nodes joined" \
        in out["fails_on_node2"]
    assert "ray: broken on node2" in out["fails_on_node2"]  # Ray's own words, not /dev/null
    assert not (home / ".ray").exists()  # no token left in the user's home
