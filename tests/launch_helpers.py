"""Run the real training CLI as a subprocess (one process or torchrun ranks over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests import zygote

REPO = Path(__file__).resolve().parents[1]


def clean_env(extra: dict | None = None) -> dict:
    """This environment without an enclosing job's launcher variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def launch(target: list[str], nproc: int, timeout: int, what: str, expect_rc: int | None = 0,
           env_extra: dict | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run `python TARGET...` as one process, or as `nproc` ranks; raise with the output when
    the exit status is not `expect_rc` (None: accept any).

    Ranks are started as SLURM's srun starts them: one plain process each, with the launcher
    variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) set, their output on shared
    pipes; the exit status is the first failing rank's, and once one fails the others get
    SIGTERM and, 10 s later, SIGKILL (torchrun's agent does the same). `torchrun=True` runs
    the real torchrun agent instead, for the tests about its behaviour (its summary, its
    teardown of the other ranks): it costs ~3 s more per run on the 2-core machine.

    Every process is a fork of tests/zygote.py's pre-warmed server where that is the same as
    a fresh interpreter. Launcher variables of an enclosing job are dropped so the child starts
    its own world. New sessions let a timeout kill every process, never leaving orphans.
    """
    env = clean_env(env_extra)
    if nproc > 1 and not torchrun:
        return _launch_ranks(target, nproc, timeout, what, expect_rc, env)
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        # --standalone: a local rendezvous on a free port, so parallel test runs don't collide.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), *target]
    with zygote.popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{what} timed out after {timeout}s: {' '.join(cmd)}\n"
                                 f"--- stderr ---\n{stderr[-8000:]}") from None
    return _result(cmd, popen.returncode, stdout, stderr, what, expect_rc)


def _result(cmd: list[str], rc: int, stdout: str, stderr: str, what: str,
            expect_rc: int | None) -> subprocess.CompletedProcess:
    if expect_rc is not None and rc != expect_rc:
        raise AssertionError(f"{what} exited {rc}, expected {expect_rc}: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


def _launch_ranks(target: list[str], nproc: int, timeout: int, what: str,
                  expect_rc: int | None, env: dict) -> subprocess.CompletedProcess:
    import threading
    import time

    from pretrain.parallel.dist import free_port

    cmd = [sys.executable, *target]
    port = str(free_port())
    pipes = [os.pipe(), os.pipe()]  # stdout, stderr: shared by the ranks, as torchrun's are
    procs = []
    try:
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port)
            procs.append(zygote.popen(cmd, cwd=REPO, env=rank_env, stdout=pipes[0][1],
                                      stderr=pipes[1][1], stdin=subprocess.DEVNULL,
                                      start_new_session=True))
    finally:
        for _, write in pipes:
            os.close(write)
    texts: list[list[str]] = [[], []]
    readers = []
    for (read, _), text in zip(pipes, texts):
        def drain(fd=read, sink=text):
            with os.fdopen(fd, errors="replace") as stream:
                sink.append(stream.read())
        readers.append(threading.Thread(target=drain, daemon=True))
        readers[-1].start()

    def signal_all(sig: int) -> None:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    deadline, failed, rc = time.monotonic() + timeout, None, 0
    while None in [proc.poll() for proc in procs]:  # a list: poll every rank, each time
        if time.monotonic() > deadline:
            signal_all(signal.SIGKILL)
            for thread in readers:
                thread.join(10)
            raise AssertionError(f"{what} timed out after {timeout}s: {nproc} ranks of "
                                 f"{' '.join(cmd)}\n--- stderr ---\n{''.join(texts[1])[-8000:]}")
        bad = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
        if bad and failed is None:  # the first failure: stop the others, as torchrun does
            failed, rc = time.monotonic(), bad[0]
            signal_all(signal.SIGTERM)
        elif failed is not None and time.monotonic() > failed + 10:
            signal_all(signal.SIGKILL)
        time.sleep(0.02)
    if failed is None:
        rc = next((proc.returncode for proc in procs if proc.returncode), 0)
    for thread in readers:
        thread.join(30)
    return _result(cmd, rc, "".join(texts[0]), "".join(texts[1]), what, expect_rc)


def run_training(run_dir: Path, overrides: list[str], nproc: int = 1,
                 config: str = "configs/smoke.yaml", timeout: int = 300, expect_rc: int | None = 0,
                 env_extra: dict | None = None, torchrun: bool = False
                 ) -> subprocess.CompletedProcess:
    args = ["--config", config, f"run.dir={run_dir}", *overrides]
    return launch(["-m", "pretrain.train", *args], nproc, timeout, "training", expect_rc, env_extra,
                  torchrun)


def start_ranks(run_dir: Path, overrides: list[str], nproc: int, log_dir: Path,
                config: str = "configs/smoke.yaml", env_extra: dict | None = None) -> list:
    """One plain process per rank (as `srun` starts them: no torchrun agent in between), so
    each rank's own exit status and signals are observable. Output goes to LOG_DIR/rankN.log."""
    from pretrain.parallel.dist import free_port

    port = str(free_port())
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(nproc):
        env = clean_env(env_extra)
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out = open(log_dir / f"rank{rank}.log", "w")
        procs.append(zygote.popen(
            [sys.executable, "-m", "pretrain.train", "--config", config, f"run.dir={run_dir}",
             *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True))
        out.close()
    return procs


def wait_all(procs: list, timeout: int) -> list[int]:
    """Exit statuses; on timeout every process is killed and the test fails."""
    import time

    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"ranks did not finish within {timeout}s") from None
    return codes


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_on_terminal(cmd: list[str], timeout: int = 120) -> tuple[int, str, str]:
    """Run `cmd` with stderr on a pseudo-terminal (as a user at a shell sees it) and stdout on
    a pipe: (exit status, stdout, what the terminal showed)."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    # 24 x 100 characters: a fresh pty has no size, and progress bars then draw nothing.
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk and proc.poll() is not None:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(), stdout, shown.decode(errors="replace")


def session_processes(sid: int) -> list[str]:
    """`pid sid stat args` of every live process of a session (zombies hold nothing)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines()
            if line.split()[1] == str(sid) and not line.split()[2].startswith("Z")]


def leftover_processes(sid: int, timeout: float = 20) -> list[str]:
    """The processes of a session still alive after waiting up to `timeout` s for them to go
    (a process started with start_new_session=True leads a session of its own pid)."""
    import time

    deadline = time.monotonic() + timeout
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return session_processes(sid)
