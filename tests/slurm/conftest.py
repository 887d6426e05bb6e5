"""A real single-node SLURM cluster for the tests in this directory (tests/slurm/cluster.py).
Outside CI the tests skip when SLURM is not installed or cannot start; in CI (CI=true, where
.ci/run installs Debian's packages) they fail instead."""

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


@pytest.fixture(scope="session")
def slurm():
    try:
        conf = cluster.start(ROOT)
    except cluster.ClusterUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests, but the cluster did not start: {err}")
        pytest.skip(f"no SLURM cluster here: {err}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield Slurm(conf)
    cluster.stop(ROOT)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


class Slurm:
    def __init__(self, conf: Path):
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
