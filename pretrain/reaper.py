"""A watcher process that SIGKILLs what a process started once that process is gone, however
it ended (SIGKILL included): forked checkpoint writers, Ray's agents, their children.

Why: kernel fate-sharing (PR_SET_PDEATHSIG) covers only a direct child, and only when it
sets it itself. megatron's async writer forks writers of its own and Ray's raylet starts
agents; after a SIGKILL of the parent these lived on, holding memory and the job's stdout
(`... | tee log` never returned). The watcher is a fresh interpreter (no fork of a threaded
process), looks at the parent's descendants every `interval` seconds, and when the parent
has gone kills the ones it saw that are still the same processes (pid and start time).

    start_reaper()          # in the process whose descendants must not outlive it
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_started_for: int | None = None
_watcher: subprocess.Popen | None = None  # held so no "still running" warning at exit


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "
    if fields[0] == b"Z":  # a zombie holds nothing
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry))
                starts[int(entry)] = info[1]
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in starts:
            out[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return out


def watch(parent: int, interval: float) -> None:
    """Runs in the watcher: snapshot the parent's descendants until it dies, then kill them."""
    me = os.getpid()
    seen: dict[int, int] = {}
    while os.getppid() == parent:
        seen.update({pid: start for pid, start in descendants(parent).items() if pid != me})
        time.sleep(interval)
    # The parent is gone. Its orphans now belong to init; kill those we saw, and their
    # children (snapshotted from the orphans before each is killed).
    for _ in range(3):
        for pid, start in list(seen.items()):
            seen.update(descendants(pid))
            info = _stat(pid)
            if info is not None and info[1] == start and pid != me:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(interval)


def start_reaper(interval: float = 0.5) -> None:
    """Start the watcher for this process (once; Linux only, elsewhere a no-op)."""
    global _started_for, _watcher
    if _started_for == os.getpid() or not os.path.isdir("/proc/self"):
        return
    _started_for = os.getpid()
    # No inherited stdout/stderr: the watcher must not keep a pipe of the job open.
    _watcher = subprocess.Popen([sys.executable, "-c", "import sys; from pretrain.reaper import watch; "
                      "watch(int(sys.argv[1]), float(sys.argv[2]))", str(os.getpid()), str(interval)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                         [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          os.environ.get("PYTHONPATH", "")])})
