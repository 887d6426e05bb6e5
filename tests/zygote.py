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

import gc
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISABLE_ENV = "PRETRAIN_TEST_ZYGOTE"
# What the server imports before it forks: what the CLIs the suite starts import at the top.
PRELOAD = ("torch", "deepspeed", "megatron.core", "pretrain.train", "pretrain.evaluate",
           "pretrain.hf.export", "torch.distributed.run")
# Variables the interpreter or a preloaded library reads once, at start or import: a child
# whose environment differs from the server's in one of these needs a server started with
# them (transformers and tokenizers are not preloaded, so their variables are not here).
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "PYTORCH_", "CUDA_",
                   "LD_", "MALLOC_", "DS_", "TORCH_EXTENSIONS_DIR", "TORCH_HOME", "TORCHINDUCTOR_",
                   "TORCHDYNAMO_", "TORCH_LOGS", "TORCH_COMPILE", "HOME", "TMPDIR", "XDG_")
# ... except these, which torchrun sets for its workers and torch reads when it needs them.
RUNTIME_ENV = ("TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")


# ----------------------------------------------------------------------------- wire format

def _send(conn: socket.socket, obj, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], fds)
    else:
        conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("zygote connection closed")
        buf += chunk
    return buf


def _recv(conn: socket.socket, with_fds: int = 0):
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
        if len(head) < 4:
            head += _recv_exact(conn, 4 - len(head))
    else:
        head = _recv_exact(conn, 4)
    (size,) = struct.unpack("!I", head)
    return json.loads(_recv_exact(conn, size)), fds


# ----------------------------------------------------------------------------- server

def _parse(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """`[-u] (-m module | script) args...` -> (kind, target, args); None when not forkable."""
    i = 0
    while i < len(argv) and argv[i] == "-u":
        i += 1
    if i >= len(argv):
        return None
    if argv[i] == "-m" and i + 1 < len(argv):
        return "module", argv[i + 1], argv[i + 2:]
    if argv[i].startswith("-"):
        return None
    return "script", argv[i], argv[i + 1:]


def _serve(path: str, ready_fd: int) -> tuple[dict, list[int]]:
    """Accept requests until killed; returns only in a forked child, with its request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    parent = os.getppid()
    waiting: dict[int, socket.socket] = {}
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    while True:
        ready = select.select([listener, wake_r], [], [], 1.0)[0]
        if wake_r in ready:
            os.read(wake_r, 4096)
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()
        if os.getppid() != parent:  # the test session is gone
            os._exit(0)
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = _recv(conn, with_fds=3)
        except (OSError, EOFError, ValueError):
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for sock in (listener, conn, *waiting.values()):
                sock.close()
            os.close(wake_r)
            os.close(wake_w)
            return request, fds
        for fd in fds:
            os.close(fd)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            pass
        waiting[pid] = conn


def _become(request: dict, fds: list[int], server_path: str) -> None:
    """In the forked child: take the requested stdio, session, directory and environment,
    then run the module or script as `python` would."""
    import random
    import runpy

    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()  # the same mapping object: modules holding os.environ see the change
    os.environ.update(request["env"])
    random.seed()  # a fresh interpreter's Python RNG is seeded from the OS, not shared
    kind, target, args = _parse(request["argv"])
    if kind == "module" and target == "torch.distributed.run":
        _fork_torchrun_workers(server_path)
    sys.modules.pop(target, None)  # preloaded for its imports; runs afresh as __main__
    if kind == "module":
        sys.argv = [target, *args]  # run_module(alter_sys=True) replaces [0] with the file
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(target)
        sys.argv = [target, *args]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


_ZYGOTE_ENV: dict = {}  # the server's own environment, in its forks


def _fork_torchrun_workers(server_path: str) -> None:
    """torchrun's agent starts each worker with subprocess.Popen: ask the server for a fork
    instead, with the same arguments, environment and inherited stdio."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import (
        subprocess_handler as handler,
    )

    def _popen(self, args, env):
        return popen(list(args), env=env, stdout=self._stdout, stderr=self._stderr,
                     start_new_session=True, server=(server_path, _ZYGOTE_ENV))

    handler.SubprocessHandler._popen = _popen


def _check_clean() -> None:
    """A fork is only as good as its parent: no other threads (their locks would be copied
    held), no process group, no accelerator context."""
    import torch
    import torch.distributed as dist

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1 or threading.active_count() != 1:
        raise SystemExit(f"zygote: {threads} threads after the preload; forking is unsafe")
    if dist.is_available() and dist.is_initialized():
        raise SystemExit("zygote: a process group exists after the preload")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise SystemExit("zygote: CUDA was initialized by the preload")


def main() -> None:
    path, ready_fd = sys.argv[1], int(sys.argv[2])
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    _check_clean()
    gc.freeze()  # as a CLI does after its imports (pretrain/train.py's main): fast exits
    _ZYGOTE_ENV.update(os.environ)
    request, fds = _serve(path, ready_fd)
    _become(request, fds, path)


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
            reply, _ = _recv(self._conn)
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
        self.process = subprocess.Popen([sys.executable, "-m", "tests.zygote", self.path,
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
    parsed = _parse(list(cmd[1:])) if cmd and cmd[0] == sys.executable else None
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
        _send(conn, {"argv": list(cmd[1:]), "env": env, "cwd": cwd,
                     "new_session": start_new_session}, [fd_in, fd_out, fd_err])
        reply, _ = _recv(conn)
    finally:
        for fd in to_close:
            os.close(fd)
    return ZygoteProcess(cmd, conn, reply["pid"], ours.get("stdout"), ours.get("stderr"))


if __name__ == "__main__":
    main()
