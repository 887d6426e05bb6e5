"""Where this job runs: SLURM, torchrun or a plain process; the allocation's host list; the
rendezvous address and port.

    python -m launch.env master-addr     # first host of the allocation
    python -m launch.env master-port     # a port derived from the job id
    python -m launch.env hostnames       # one host per line
    python -m launch.env describe        # launcher, ranks, nodes, master

Ranks and world size for training come from pretrain.parallel.dist.detect_env (the same
rules); this module adds what only the launch scripts need.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from pretrain.errors import EXIT_BAD_INPUT

PORT_BASE, PORT_SPAN = 20000, 20000  # job ports in [20000, 40000): below Linux's ephemeral range


def launcher(environ=os.environ) -> str:
    """The training launcher's answer (pretrain.parallel.dist.detect_env), plus "slurm-batch"
    for sbatch's script before srun. Imported lazily: the scripts call this module for the
    rendezvous address, which must not pay for importing torch."""
    from pretrain.parallel.dist import detect_env

    found = detect_env(environ).launcher
    if found == "single" and "SLURM_JOB_ID" in environ:
        return "slurm-batch"
    return found


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[001-003,007],login1") as host names, in order.
    Uses `scontrol show hostnames` when available (it knows every site's syntax), else
    this parser (ranges with zero padding, several bracket groups, comma lists)."""
    if not nodelist:
        return []
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    return _expand(nodelist)


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"unbalanced brackets in host list {text!r}")
    return parts + [current] if current else parts


def _expand(nodelist: str) -> list[str]:
    hosts = []
    for item in _split_top(nodelist):
        match = re.search(r"\[([^\]]+)\]", item)
        if not match:
            hosts.append(item)
            continue
        head, tail = item[:match.start()], item[match.end():]
        for piece in match.group(1).split(","):
            if "-" in piece:
                lo, hi = piece.split("-", 1)
                width = len(lo)
                if int(hi) < int(lo):
                    raise ValueError(f"descending range {piece!r} in host list {nodelist!r}")
                for n in range(int(lo), int(hi) + 1):
                    hosts.extend(_expand(f"{head}{n:0{width}d}{tail}"))
            else:
                hosts.extend(_expand(f"{head}{piece}{tail}"))
    return hosts


def master_addr(environ=os.environ) -> str:
    """MASTER_ADDR if set (e.g. the first node's fast-network name), else the first host of
    the allocation, else localhost."""
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    hosts = expand_hostlist(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "")))
    return hosts[0] if hosts else "127.0.0.1"


def master_port(environ=os.environ) -> int:
    """MASTER_PORT if set, else one derived from the job id: two jobs sharing a node get
    different ports, and every task of a job computes the same one without talking."""
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"])
    job = environ.get("SLURM_JOB_ID")
    if job is None:
        return 29500
    return PORT_BASE + int(job) % PORT_SPAN


def describe(environ=os.environ) -> str:
    hosts = expand_hostlist(environ.get("SLURM_JOB_NODELIST", ""))
    return (f"launcher {launcher(environ)}, job {environ.get('SLURM_JOB_ID', '-')}, "
            f"{len(hosts) or 1} node(s) {','.join(hosts) or 'localhost'}, "
            f"tasks {environ.get('SLURM_NTASKS', environ.get('WORLD_SIZE', '1'))}, "
            f"master {master_addr(environ)}:{master_port(environ)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "describe"
    if what == "master-addr":
        print(master_addr())
    elif what == "master-port":
        print(master_port())
    elif what == "hostnames":
        print("\n".join(expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", ""))))
    elif what == "describe":
        print(describe())
    else:
        print("usage: python -m launch.env [master-addr|master-port|hostnames|describe]",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
