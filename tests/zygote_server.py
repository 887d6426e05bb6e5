"""The fork server of tests/zygote.py (the why and the protocol are there): it imports what
the suite's CLIs import (PRELOAD), checks that forking is safe, then forks one child per
request; the child takes the caller's stdio, session, directory and environment and runs the
module or script as `python` would.

    python -m tests.zygote_server SOCKET READY_FD   (tests/zygote.py starts it)
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import threading

# What the server imports before it forks: what the CLIs the suite starts import at the top.
PRELOAD = ("torch", "deepspeed", "megatron.core", "pretrain.train", "pretrain.evaluate",
           "pretrain.hf.export", "torch.distributed.run")


# ----------------------------------------------------------------------------- wire format

def send_message(conn: socket.socket, obj, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], fds)
    else:
        conn.sendall(payload)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("zygote connection closed")
        buf += chunk
    return buf


def recv_message(conn: socket.socket, with_fds: int = 0):
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
        if len(head) < 4:
            head += recv_exact(conn, 4 - len(head))
    else:
        head = recv_exact(conn, 4)
    (size,) = struct.unpack("!I", head)
    return json.loads(recv_exact(conn, size)), fds


# ----------------------------------------------------------------------------- server

def parse_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
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
                    send_message(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()
        if os.getppid() != parent:  # the test session is gone
            os._exit(0)
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = recv_message(conn, with_fds=3)
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
            send_message(conn, {"pid": pid})
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
    kind, target, args = parse_command(request["argv"])
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

    from tests import zygote

    def _popen(self, args, env):
        return zygote.popen(list(args), env=env, stdout=self._stdout, stderr=self._stderr,
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


if __name__ == "__main__":
    main()
