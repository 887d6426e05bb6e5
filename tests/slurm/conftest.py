"""Real SLURM clusters for the tests in this directory (tests/slurm/cluster.py): one node, and
two nodes in network namespaces. Outside CI the tests skip when SLURM is not installed or a
cluster cannot start (no root, namespaces not permitted); in CI (CI=true, where .ci/run
installs Debian's packages) they fail instead."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch_helpers import clean_env
from tests.slurm import cluster

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/tmp/pretrain-test-slurm")
ROOT_TWO_NODES = Path("/tmp/pretrain-test-slurm2")


def _start(root: Path, nodes: int) -> Path:
    try:
        return cluster.start(root, nodes)
    except cluster.ClusterUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests, but the {nodes}-node cluster did not "
                        f"start: {err}")
        pytest.skip(f"no {nodes}-node SLURM cluster here: {err}")


@pytest.fixture(scope="session")
def slurm():
    conf = _start(ROOT, 1)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield Slurm(conf)
    cluster.stop(ROOT)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """Hosts node1 and node2, each in its own network namespace; stopped and its namespaces
    removed at the end of the session, failed tests included (and at the next start, if a
    killed session left them behind)."""
    conf = _start(ROOT_TWO_NODES, 2)
    try:
        yield Slurm(conf)
    finally:
        cluster.stop(ROOT_TWO_NODES, 2)


class Slurm:
    def __init__(self, conf: Path):
        self.root = conf.parent
        self.env = clean_env({"SLURM_CONF": str(conf)})

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), cwd=REPO, env=self.env, capture_output=True, text=True,
                             timeout=60)
        if check and out.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        return out

    def sbatch(self, script: str, *flags: str, env: dict | None = None, output: Path) -> int:
        out = subprocess.run(["sbatch", "--parsable", f"--output={output}", *flags, script],
                             cwd=REPO, env={**self.env, **(env or {})}, capture_output=True,
                             text=True, timeout=60)
        if out.returncode:
            raise AssertionError(f"sbatch {script} failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: int, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}")
