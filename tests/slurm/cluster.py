"""A real single-node SLURM cluster on this machine, for the launch tests: munged, slurmctld
and slurmd from Debian's packages, configured in a private directory (clients find it
through SLURM_CONF). Needs root, as CI and the development machines run.

    python tests/slurm/cluster.py start DIR   # prints the SLURM_CONF to export
    python tests/slurm/cluster.py stop DIR
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol")


class ClusterUnavailable(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None
            and not Path("/usr/sbin", tool).exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def _start_munge() -> None:
    if _run(["pgrep", "-x", "munged"]).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        out = _run([_tool("mungekey"), "-c", "-k", str(key)])
        if out.returncode:
            raise ClusterUnavailable(f"mungekey failed: {out.stderr.strip()}")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    out = _run(["runuser", "-u", "munge", "--", _tool("munged")])
    if out.returncode:
        raise ClusterUnavailable(f"munged failed to start: {out.stderr.strip()}")


def write_config(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=ci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after its old credential expired (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldPort=6917
SlurmdPort=6918
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
# Oversubscribe the 2 CPUs: the tests run 2-rank jobs next to a shard job.
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


def start(root: Path, timeout: float = 60.0) -> Path:
    """Start (or reuse) the cluster; returns the slurm.conf path. Raises ClusterUnavailable."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster needs root (slurmd runs jobs as their users)")
    missing = missing_tools()
    if missing:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)} (apt-get install "
                                 f"slurmctld slurmd slurm-client munge)")
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf))
    if conf.exists() and _run(["sinfo", "-h"], env=env).returncode == 0:
        return conf
    write_config(root)
    _start_munge()
    for daemon in ("slurmctld", "slurmd"):
        out = _run([_tool(daemon), "-f", str(conf)], env=env)
        if out.returncode:
            log = (root / "log" / f"{daemon}.log")
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise ClusterUnavailable(f"{daemon} failed: {out.stderr.strip()} {tail}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _run(["sinfo", "-h", "-o", "%T"], env=env)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
            return conf
        time.sleep(0.5)
    raise ClusterUnavailable(f"the node did not become idle in {timeout:.0f}s "
                             f"(sinfo: {out.stdout.strip() or out.stderr.strip()})")


def stop(root: Path) -> None:
    for daemon in ("slurmd", "slurmctld"):
        pid_file = root / f"{daemon}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(start(where))
    else:
        stop(where)
