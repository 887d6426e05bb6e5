"""A pre-warmed fork server for the suite's Python subprocesses: each `python -m pretrain.train
...` (and each torchrun rank) becomes a fork of one process that imported torch, megatron-core
and DeepSpeed once, instead of a fresh interpreter that spends ~5 s importing them.

Why a fork per case and not long-lived ranks: a forked child is a new process in every way a
test can observe (its own pid, session, exit status, signals, file descriptors, parallel_state,
DeepSpeed groups, RNG tracker), so no case can leak state into the next and none needs a reset
between cases; only the imports are shared. The server never initializes a process group, starts
a thread or touches an accelerator before forking (it checks), so the fork is as clean as
multiprocessing's forkserver with preloaded modules, which is what this is, plus a CLI's argv.

    proc = popen([sys.executable, "-m", "pretrain.train", ...], env=..., cwd=...,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 start_new_session=True)   # a ZygoteProcess, or a subprocess.Popen (fallback)

A server is started with the caller's environment, and serves only callers whose variables
read at import time (OMP_*, PYTHON*, ATEN_*, HOME, ...: IMPORT_TIME_ENV) are the same; another
setting of them gets a server of its own (at most MAX_SERVERS). `popen` starts a real
`subprocess.Popen` where a fork could differ from a fresh interpreter: a command that is not
`python [-u] (-m module | script.py) ...`, stdin from a pipe. `PRETRAIN_TEST_ZYGOTE=0` turns
the servers off for a whole run (every case then starts a fresh interpreter, as before). The
session ends with one line counting forks and fresh interpreters, with the reasons.

torchrun runs in a fork too, and its agent's workers are forked by the same server
(SubprocessHandler._popen is redirected in that child only).

Protocol (Unix socket, one connection per child): the client sends a length-prefixed JSON
request with its stdin/stdout/stderr descriptors (SCM_RIGHTS); the server forks, answers the
child's pid, and when it reaps the child, its exit status (Popen's convention: -N for signal N).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.zygote_server import parse_command, recv_message, send_message

REPO = Path(__file__).resolve().parents[1]
DISABLE_ENV = "PRETRAIN_TEST_ZYGOTE"
# Variables the interpreter or a preloaded library reads once, at start or import: a child
# whose environment differs from the server's in one of these needs a server started with
# them (transformers and tokenizers are not preloaded, so their variables are not here).
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "PYTORCH_", "CUDA_",
                   "LD_", "MALLOC_", "DS_", "TORCH_EXTENSIONS_DIR", "TORCH_HOME", "TORCHINDUCTOR_",
                   "TORCHDYNAMO_", "TORCH_LOGS", "TORCH_COMPILE", "HOME", "TMPDIR", "XDG_")
# ... except these, which torchrun sets for its workers and torch reads when it needs them.
RUNTIME_ENV = ("TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")


# ----------------------------------------------------------------------------- client

class ZygoteProcess:
    """The parts of subprocess.Popen the suite and torchrun's agent use, for a forked child
    that is not our own child (its exit status comes over the server's connection)."""

    def __init__(self, args, conn: socket.socket, pid: int, stdout=None, stderr=None):
        self.args, self.pid, self.returncode = args, pid, None
        self.stdout, self.stderr, self.stdin = stdout, stderr, None
        self._conn = conn
        self._readers: list[threading.Thread] = []
        self._output: dict[str, list] = {}

    def _collect(self, block: bool, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        if not select.select([self._conn], [], [], timeout if block else 0.0)[0]:
            return
        try:
            reply, _ = recv_message(self._conn)
        except (EOFError, OSError):  # the server died: the child's status is lost
            reply = {"returncode": -signal.SIGKILL}
        self.returncode = reply["returncode"]
        self._conn.close()

    def poll(self):
        self._collect(block=False, timeout=None)
        return self.returncode

    def wait(self, timeout: float | None = None):
        self._collect(block=True, timeout=timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout: float | None = None):
        if input is not None:
            raise ValueError("ZygoteProcess.communicate: no stdin pipe")
        if not self._readers:
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None:
                    chunks = self._output.setdefault(name, [])
                    thread = threading.Thread(target=lambda s=stream, c=chunks: c.append(s.read()),
                                              daemon=True)
                    thread.start()
                    self._readers.append(thread)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._readers:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        result = []
        for name in ("stdout", "stderr"):
            chunks = self._output.get(name)
            result.append(chunks[0] if chunks else None)
            stream = getattr(self, name)
            if stream is not None:
                stream.close()
        return tuple(result)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        if self.returncode is None:
            try:
                self.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass


class _Server:
    """One running server: its process, socket and the environment it was started with."""

    def __init__(self, env: dict):
        self.env = env
        self.path = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "sock")
        # Its own output (import-time warnings) goes nowhere: each fork gets its caller's stdio.
        ready_r, ready_w = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-m", "tests.zygote_server", self.path,
                                         str(ready_w)], cwd=REPO, env=env, pass_fds=(ready_w,),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(ready_w)
        with os.fdopen(ready_r) as ready:
            self.ready = ready.readline().strip() == "ready"

    def alive(self) -> bool:
        return self.ready and self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


# One server per distinct setting of the import-time variables (most of the suite shares the
# first; a test that sets HOME or ATEN_CPU_CAPABILITY gets its own), at most MAX_SERVERS.
MAX_SERVERS = 4
_servers: dict[tuple, _Server] = {}
_lock = threading.Lock()
STATS = {"servers": 0, "forked": 0, "fresh": {}}  # what tests/conftest.py reports at the end of a session


def _import_time_items(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(IMPORT_TIME_ENV) and k not in RUNTIME_ENV))


def _server_for(env: dict) -> tuple[_Server | None, str]:
    """The running server whose import-time environment is `env`'s (started on first use),
    or None and why not."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"{DISABLE_ENV}=0"
    key = _import_time_items(env)
    with _lock:
        server = _servers.get(key)
        if server is None:
            if len(_servers) >= MAX_SERVERS:
                return None, f"more than {MAX_SERVERS} import-time environments"
            server = _servers[key] = _Server(env)
            STATS["servers"] += server.ready
        return (server, "") if server.alive() else (None, "its server did not start")


def stop() -> None:
    with _lock:
        for server in _servers.values():
            server.stop()
        _servers.clear()


def summary() -> str:
    fresh = STATS["fresh"]
    why = ", ".join(f"{reason}: {count}" for reason, count in sorted(fresh.items()))
    return (f"zygote: {STATS['forked']} processes forked from {STATS['servers']} pre-warmed "
            f"server(s), {sum(fresh.values())} fresh interpreters" + (f" ({why})" if why else ""))


def _fresh(cmd: list[str], reason: str, **kwargs) -> subprocess.Popen:
    STATS["fresh"][reason] = STATS["fresh"].get(reason, 0) + 1
    return subprocess.Popen(cmd, **kwargs)


def popen(cmd: list[str], *, env: dict | None = None, cwd=None, stdout=None, stderr=None,
          stdin=None, text: bool = False, start_new_session: bool = False,
          server: tuple[str, dict] | None = None):
    """subprocess.Popen(cmd, ...), as a fork of the pre-warmed server where that is the same
    thing (see the module's docstring), else a real Popen."""
    env = dict(os.environ if env is None else env)
    cwd = str(cwd or os.getcwd())
    plain = dict(env=env, cwd=cwd, stdout=stdout, stderr=stderr, stdin=stdin, text=text,
                 start_new_session=start_new_session)
    parsed = parse_command(list(cmd[1:])) if cmd and cmd[0] == sys.executable else None
    if parsed is None:
        return _fresh(cmd, "not python -m MODULE or python SCRIPT", **plain)
    if stdin not in (None, subprocess.DEVNULL) and not hasattr(stdin, "fileno"):
        return _fresh(cmd, "stdin is not a file", **plain)
    if server is None:
        running, why = _server_for(env)
        if running is None:
            return _fresh(cmd, why, **plain)
        server_path = running.path
    else:  # in a fork (torchrun's agent): its own server, if the environment still matches
        server_path, server_env = server
        if _import_time_items(env) != _import_time_items(server_env):
            return _fresh(cmd, "an import-time variable differs", **plain)
    STATS["forked"] += 1

    to_close, ours = [], {}

    def descriptor(spec, default: int, name: str) -> int:
        if spec is None:
            return default
        if spec == subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR)
            to_close.append(fd)
            return fd
        if spec == subprocess.PIPE:
            read, write = os.pipe()
            to_close.append(write)
            ours[name] = os.fdopen(read, "r" if text else "rb")
            return write
        if spec == subprocess.STDOUT:
            return -1  # resolved below
        return spec if isinstance(spec, int) else spec.fileno()

    fd_in = descriptor(stdin, 0, "stdin")
    fd_out = descriptor(stdout, 1, "stdout")
    fd_err = descriptor(stderr, 2, "stderr")
    if fd_err == -1:
        fd_err = fd_out
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server_path)
        send_message(conn, {"argv": list(cmd[1:]), "env": env, "cwd": cwd,
                     "new_session": start_new_session}, [fd_in, fd_out, fd_err])
        reply, _ = recv_message(conn)
    finally:
        for fd in to_close:
            os.close(fd)
    return ZygoteProcess(cmd, conn, reply["pid"], ours.get("stdout"), ours.get("stderr"))
