"""tests/zygote.py, the fork server most of the suite's subprocesses come from: a fork must be
indistinguishable from a fresh interpreter in everything a test looks at (argv, environment,
directory, session, stdio, exit status, signals), and must not be used where it could differ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote
from tests.launch_helpers import REPO, clean_env, launch

pytestmark = [pytest.mark.slow,  # starts the server (~5 s of imports) when no test did before
              pytest.mark.skipif(os.environ.get(zygote.DISABLE_ENV) == "0",
                                 reason=f"the fork server is off ({zygote.DISABLE_ENV}=0)")]
PROBE = "tests/zygote_probe.py"


def _server_pid(env_extra: dict | None = None) -> int:
    return zygote._servers[zygote._import_time_items(clean_env(env_extra))].process.pid


def _probe(*args: str, env_extra: dict | None = None, cwd=REPO):
    proc = zygote.popen([sys.executable, str(REPO / PROBE), *args], env=clean_env(env_extra),
                        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
    return proc


def test_a_fork_sees_what_a_fresh_interpreter_sees(tmp_path):
    proc = _probe("3", "x y", env_extra={"PROBE_VALUE": "v1"}, cwd=tmp_path)
    assert isinstance(proc, zygote.ZygoteProcess)
    out, err = proc.communicate(timeout=60)
    state = json.loads(out)
    assert proc.returncode == 3
    assert state["argv"] == ["3", "x y"] and state["cwd"] == str(tmp_path)
    assert state["env"] == "v1" and state["main"] == "__main__"
    assert state["file"] == "zygote_probe.py"
    assert state["pid"] == proc.pid == state["sid"] == state["pgid"]  # its own session
    assert state["ppid"] == _server_pid()
    assert state["torch_threads"] == 1  # OMP_NUM_THREADS=1, as clean_env sets it
    assert err == "to stderr\n"
    # A second fork does not see the first one's environment.
    out, _ = _probe("0").communicate(timeout=60)
    assert json.loads(out)["env"] is None


def test_an_uncaught_exception_exits_1_with_its_traceback():
    proc = _probe("raise")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "RuntimeError: probe failure" in err and "Traceback" in err


def test_signals_reach_the_fork_and_its_status_says_so():
    proc = _probe("wait")
    assert json.loads(proc.stdout.readline())["argv"] == ["wait"]
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.terminate()
    assert proc.wait(timeout=30) == -signal.SIGTERM
    proc.communicate(timeout=30)


def test_an_import_time_variable_gets_a_server_of_its_own(tmp_path):
    proc = _probe("0", env_extra={"TMPDIR": str(tmp_path)})
    assert isinstance(proc, zygote.ZygoteProcess)
    state = json.loads(proc.communicate(timeout=120)[0])
    assert state["tmp"] == str(tmp_path)  # tempfile caches it: the server was started with it
    assert state["ppid"] == _server_pid({"TMPDIR": str(tmp_path)}) != _server_pid()


def test_a_server_that_would_fork_threads_is_not_used():
    """With OMP_NUM_THREADS=2 the import leaves an OpenMP thread behind; a fork would copy
    its locks held, so the server refuses to serve and every caller gets a real interpreter."""
    proc = _probe("0", env_extra={"OMP_NUM_THREADS": "2"})
    assert isinstance(proc, subprocess.Popen)
    state = json.loads(proc.communicate(timeout=120)[0])
    assert state["torch_threads"] == 2 and state["ppid"] == os.getpid()


def test_what_a_fork_cannot_be_is_a_fresh_interpreter():
    proc = zygote.popen([sys.executable, "-c", "import os; print(os.getppid())"],
                        env=clean_env(), stdout=subprocess.PIPE, text=True)
    assert isinstance(proc, subprocess.Popen)
    assert int(proc.communicate(timeout=60)[0]) == os.getpid()


@pytest.mark.parametrize("torchrun", [False, True], ids=["ranks", "torchrun"])
def test_ranks_are_forks_with_the_launcher_variables(torchrun):
    out = launch([PROBE, "0"], 2, 120, "probe", torchrun=torchrun).stdout
    states = sorted((json.loads(line) for line in out.splitlines()), key=lambda s: s["rank"])
    assert [(s["rank"], s["world"]) for s in states] == [("0", "2"), ("1", "2")]
    assert {s["ppid"] for s in states} == {_server_pid()}  # torchrun's workers too


def test_one_failing_rank_stops_the_others():
    start = time.monotonic()
    out = launch([PROBE, "fail-rank1"], 2, 120, "probe", expect_rc=3)
    assert time.monotonic() - start < 20  # rank 0 would sleep 60 s; it got SIGTERM
    assert len(out.stdout.splitlines()) == 2
