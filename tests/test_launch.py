"""launch/: host lists, rendezvous address and port, the node preflight (on this machine,
as a one-node allocation), and the run-directory ownership check of the config."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import env as lenv
from launch import preflight
from pretrain.errors import EXIT_PREFLIGHT
from pretrain.config import ConfigError, check_run_dir, load_config, save_config
from pretrain.parallel.dist import free_port
from tests.launch_helpers import clean_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
    ("a[1-2],b,c[08-10]", ["a1", "a2", "b", "c08", "c09", "c10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_hostlist_expansion(nodelist, hosts):
    assert lenv._expand(nodelist) == hosts


def test_hostlist_rejects_garbage():
    with pytest.raises(ValueError, match="unbalanced"):
        lenv._expand("gpu[001-003")
    with pytest.raises(ValueError, match="descending"):
        lenv._expand("gpu[5-3]")


def test_master_addr_and_port():
    job = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-008]"}
    assert lenv.master_port(job) == lenv.PORT_BASE + 123456 % lenv.PORT_SPAN
    assert lenv.master_port({**job, "MASTER_PORT": "4242"}) == 4242
    assert lenv.master_addr({"SLURM_JOB_NODELIST": "gpu[007-008]"}) == "gpu007"
    assert lenv.master_addr({**job, "MASTER_ADDR": "gpu007-ib"}) == "gpu007-ib"
    assert lenv.master_addr({}) == "127.0.0.1"
    assert lenv.launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert lenv.launcher({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == "slurm"
    assert lenv.launcher({"SLURM_JOB_ID": "5"}) == "slurm-batch"


def test_code_revision_sees_any_source_change(tmp_path):
    for top in preflight.SOURCE_DIRS:
        (tmp_path / top).mkdir()
    (tmp_path / "pretrain" / "a.py").write_text("x = 1\n")
    before = preflight.code_revision(tmp_path)
    assert preflight.code_revision(tmp_path) == before
    (tmp_path / "pretrain" / "a.py").write_text("x = 2\n")
    assert preflight.code_revision(tmp_path) != before
    (tmp_path / "pretrain" / "a.py").write_text("x = 1\n")
    (tmp_path / "slurm" / "new.sh").write_text("echo\n")
    assert preflight.code_revision(tmp_path) != before


def test_master_must_be_local():
    assert preflight.check_master_is_local("127.0.0.1") is None
    problem = preflight.check_master_is_local("203.0.113.7")  # bind only: nothing is sent
    assert "is not an address of node 0" in problem


def _preflight(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.preflight", *args], cwd=REPO,
                          env=clean_env(env_extra), capture_output=True, text=True, timeout=120)


def test_preflight_one_node_passes_and_checks_gpus():
    port = str(free_port())
    out = _preflight({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, "--timeout", "20")
    assert out.returncode == 0 and "1 node(s) ok" in out.stdout, out.stderr
    out = _preflight({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, "--expect-gpus", "8",
                     "--timeout", "20")
    assert out.returncode == EXIT_PREFLIGHT == 3, out
    assert out.stderr.count("\n") == 1 and "sees 0 GPUs, the job expects 8" in out.stderr


def test_preflight_unreachable_master_fails_fast():
    out = _preflight({"MASTER_ADDR": "203.0.113.7", "MASTER_PORT": "29999"}, "--timeout", "20")
    assert out.returncode == EXIT_PREFLIGHT and "MASTER_ADDR=203.0.113.7" in out.stderr


@pytest.mark.slow
def test_preflight_node0_gives_up_on_a_node_that_never_reports():
    # Node 0 of two, and node 1 never reaches the store (it cannot route to MASTER_ADDR):
    # node 0 must fail after --timeout, not wait forever for node 1 to read the verdict.
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_NODEID": "0",
           "SLURM_NNODES": "2"}
    started = time.monotonic()
    out = _preflight(env, "--timeout", "3")
    assert out.returncode == EXIT_PREFLIGHT and "nodes [1] did not report within 3 s" in out.stderr, out.stderr
    assert time.monotonic() - started < 60


def test_run_dir_owned_by_another_run(tmp_path):
    smoke = REPO / "configs" / "smoke.yaml"
    save_config(load_config(smoke, [f"run.dir={tmp_path}"]), tmp_path / "config.yaml")
    # The same run, resumed with another layout, length, LR or checkpoint setting: fine.
    check_run_dir(load_config(smoke, [f"run.dir={tmp_path}", "parallel.tensor_parallel=2",
                                      "train.steps=50", "optim.lr=1e-3", "checkpoint.interval=5"]))
    for override, needle in [("model.hidden_size=128", "model.hidden_size=64 there, 128 here"),
                             ("train.seed=7", "train.seed=1234 there, 7 here"),
                             ("data.train=/x", "data.train=")]:
        with pytest.raises(ConfigError, match="belongs to another run") as info:
            check_run_dir(load_config(smoke, [f"run.dir={tmp_path}", override]))
        assert needle in str(info.value)


def test_run_dir_of_an_older_version_compares_by_meaning(tmp_path):
    """A config.yaml written before a key existed, or in an older spelling, is the same run."""
    smoke = REPO / "configs" / "smoke.yaml"
    cfg = load_config(smoke, [f"run.dir={tmp_path}"])
    old = cfg.to_dict()
    del old["model"]["vocab_size"]  # a key added later: its default is what the old run used
    old["data"]["train"] = "embedded"  # the string form, before blends were lists
    (tmp_path / "config.yaml").write_text(__import__("yaml").safe_dump(old))
    check_run_dir(cfg)
    old["model"]["hidden_size"] = 128
    (tmp_path / "config.yaml").write_text(__import__("yaml").safe_dump(old))
    with pytest.raises(ConfigError, match="model.hidden_size=128 there, 64 here"):
        check_run_dir(cfg)
