"""A real SLURM cluster on this machine, for the launch tests: munged, slurmctld and slurmd from
Debian's packages, configured in a private directory (clients find it through SLURM_CONF).
One node (the machine itself), or two nodes: each slurmd in its own network and UTS namespace
(hosts node1 and node2 on a private bridge, 10.77.0.0/24), so every cross-node path (MASTER_ADDR,
srun over two hosts, Ray head and worker) runs over a real network. Needs root, as CI runs.

    python tests/slurm/cluster.py start DIR [NODES]   # prints the SLURM_CONF to export
    python tests/slurm/cluster.py stop DIR [NODES]
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
# The two-node network: a bridge in this namespace (the controller's address) and one veth per
# node namespace. The addresses exist only inside what the setup creates and deletes.
BRIDGE, SUBNET = "pretrain-br0", "10.77.0"
CONTROLLER_ADDR = f"{SUBNET}.1"
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}


class ClusterUnavailable(RuntimeError):
    pass


def missing_tools(nodes: int = 1) -> list[str]:
    tools = DAEMONS + (("ip", "unshare", "nsenter") if nodes > 1 else ())
    return [tool for tool in tools if shutil.which(tool) is None
            and not Path("/usr/sbin", tool).exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def namespace(node: str) -> str:
    return f"pretrain-{node}"


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


def write_config(root: Path, nodes: int = 1) -> Path:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # One node: oversubscribe its 2 CPUs, the tests run 2-rank jobs next to a shard job. Two
    # nodes: jobs share only when they ask, so shard.sh's --exclusive holds (two Ray heads on
    # one host would compete for Ray's fixed ports, as they would on a real cluster).
    share = "FORCE:4" if nodes == 1 else "YES:4"
    if nodes == 1:
        controller, ports = host, (6917, 6918)
        node_lines = f"NodeName={host} CPUs={cpus} State=UNKNOWN"
        names = host
        (root / "spool" / host).mkdir(exist_ok=True)
    else:  # each slurmd takes its node name from its namespace's host name
        controller, ports = f"{host}({CONTROLLER_ADDR})", (6927, 6928)
        node_lines = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN"
                               for name, addr in NODES.items())
        names = ",".join(NODES)
        for name in NODES:
            (root / "spool" / name).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=ci{nodes}
SlurmctldHost={controller}
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
SlurmdSpoolDir={root / 'spool' / '%n'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd-%n.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe={share}
""")
    return conf


def _hosts_file() -> str:
    host = socket.gethostname().split(".")[0]
    lines = ["127.0.0.1 localhost", f"{CONTROLLER_ADDR} {host}"]
    return "\n".join(lines + [f"{addr} {name}" for name, addr in NODES.items()]) + "\n"


def _ip(*args: str) -> None:
    out = _run(["ip", *args])
    if out.returncode:
        raise ClusterUnavailable(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def network_up() -> None:
    """The bridge with the controller's address, and per node a namespace joined to it by a
    veth pair, its own address and an /etc/hosts (/etc/netns/NS/hosts, where `ip netns exec`
    also finds it)."""
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
    except ClusterUnavailable as err:
        raise ClusterUnavailable(f"network namespaces/bridges are not permitted here ({err})") from None
    _ip("addr", "add", f"{CONTROLLER_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for i, (node, addr) in enumerate(NODES.items(), start=1):
        ns, veth = namespace(node), f"pretrain-veth{i}"
        etc = Path("/etc/netns", ns)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(_hosts_file())
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", BRIDGE)
        _ip("link", "set", veth, "up")
        for args in (("addr", "add", f"{addr}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                     ("link", "set", "lo", "up")):
            _ip("-n", ns, *args)


def network_down() -> None:
    """Everything network_up made, and every process still running in a node's namespace
    (its slurmd and what it started); safe to call when nothing or only part of it exists."""
    for node in NODES:
        ns = namespace(node)
        if Path("/run/netns", ns).exists():
            pids = _run(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ValueError, ProcessLookupError):
                    pass
            _run(["ip", "netns", "del", ns])
        shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
    _run(["ip", "link", "del", BRIDGE])


def _start_slurmd(conf: Path, node: str | None, env: dict) -> subprocess.CompletedProcess:
    if node is None:
        return _run([_tool("slurmd"), "-f", str(conf)], env=env)
    # A UTS namespace gives the node its host name: slurmd takes its node name from it, and
    # jobs see it (gloo and the preflight resolve it through the node's own /etc/hosts, bound
    # in a private mount namespace). Not `ip netns exec`: it remounts /sys, hiding the
    # cgroup mounts slurmd's cgroup plugin needs even with task/none.
    ns = namespace(node)
    return _run(["unshare", "--mount", "--uts", "--propagation", "slave", "--",
                 "nsenter", f"--net=/run/netns/{ns}", "--", "sh", "-c",
                 'mount --bind "$1" /etc/hosts && hostname "$2" && exec "$3" -f "$4"', "sh",
                 f"/etc/netns/{ns}/hosts", node, _tool("slurmd"), str(conf)], env=env)


def _node_states(env: dict) -> list[str]:
    out = _run(["sinfo", "-h", "-N", "-o", "%T"], env=env)
    return out.stdout.split() if out.returncode == 0 else []


def _alive(pid_file: Path) -> bool:
    try:
        stat = Path(f"/proc/{int(pid_file.read_text().strip())}/stat").read_text()
    except (FileNotFoundError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ready(env: dict, nodes: int) -> bool:
    states = _node_states(env)
    return len(states) == nodes and all(s in ("idle", "mixed", "allocated") for s in states)


def start(root: Path, nodes: int = 1, timeout: float = 60.0) -> Path:
    """Start (or reuse) the cluster; returns the slurm.conf path. Raises ClusterUnavailable."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster needs root (slurmd runs jobs as their users)")
    missing = missing_tools(nodes)
    if missing:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)} (apt-get install "
                                 f"slurmctld slurmd slurm-client munge iproute2)")
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf))
    names = list(NODES) if nodes > 1 else [socket.gethostname().split(".")[0]]
    daemons = [root / "slurmctld.pid", *(root / f"slurmd-{name}.pid" for name in names)]
    # Reused only when every daemon still runs: the controller reports a dead slurmd as idle
    # until its next ping.
    if conf.exists() and all(_alive(p) for p in daemons) and _ready(env, nodes):
        return conf
    stop(root, nodes)  # what an interrupted earlier session left behind
    for stale in ("state", "spool"):
        shutil.rmtree(root / stale, ignore_errors=True)
    write_config(root, nodes)
    try:
        _start_munge()
        if nodes > 1:
            network_up()
        out = _run([_tool("slurmctld"), "-f", str(conf)], env=env)
        for node in (NODES if nodes > 1 else [None]):
            if out.returncode == 0:
                out = _start_slurmd(conf, node, env)
        if out.returncode:
            logs = " ".join(p.read_text()[-1000:] for p in (root / "log").glob("*.log"))
            raise ClusterUnavailable(f"a SLURM daemon failed: {out.stderr.strip()} {logs}")
        deadline = time.monotonic() + timeout
        while not _ready(env, nodes):
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"the nodes did not become idle in {timeout:.0f}s "
                                         f"(sinfo: {_node_states(env)})")
            time.sleep(0.5)
    except ClusterUnavailable:
        stop(root, nodes)  # no half-built cluster or network is left behind
        raise
    return conf


def slurmd_pid(root: Path, node: str) -> int:
    return int((root / f"slurmd-{node}.pid").read_text().strip())


def on_node(root: Path, node: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run CMD on a node of the two-node cluster: in its slurmd's mount, network and UTS
    namespaces, so a bind mount made here is seen by that node's jobs only."""
    return _run(["nsenter", "-t", str(slurmd_pid(root, node)), "-m", "-n", "-u", "--", *cmd])


def node_processes(node: str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live process in a node's network namespace (zombies left out)."""
    found = []
    for pid in _run(["ip", "netns", "pids", namespace(node)]).stdout.split():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited while we looked
        found.append((int(pid), [a for a in argv if a]))
    return found


def stop(root: Path, nodes: int = 1) -> None:
    """Stop the daemons (and, for two nodes, remove the namespaces and the bridge)."""
    for pid_file in [*root.glob("slurmd-*.pid"), root / "slurmctld.pid"]:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
            pid_file.unlink(missing_ok=True)
    if nodes > 1:
        network_down()


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if action == "start":
        print(start(where, count))
    else:
        stop(where, count)
