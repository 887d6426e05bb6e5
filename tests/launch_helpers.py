"""Run the real training CLI as a subprocess (one process or torchrun ranks over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
           env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python TARGET...` (nproc=1) or torchrun over it; raise with the output when the
    exit status is not `expect_rc` (None: accept any).

    Launcher variables of an enclosing job are dropped so the child starts its own world. A
    new session lets a timeout kill the launcher *and* its ranks, never leaving orphans.
    """
    env = clean_env(env_extra)
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
    if expect_rc is not None and popen.returncode != expect_rc:
        raise AssertionError(f"{what} exited {popen.returncode}, expected {expect_rc}: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


def run_training(run_dir: Path, overrides: list[str], nproc: int = 1,
                 config: str = "configs/smoke.yaml", timeout: int = 300, expect_rc: int | None = 0,
                 env_extra: dict | None = None) -> subprocess.CompletedProcess:
    args = ["--config", config, f"run.dir={run_dir}", *overrides]
    return launch(["-m", "pretrain.train", *args], nproc, timeout, "training", expect_rc, env_extra)


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
        procs.append(subprocess.Popen(
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
