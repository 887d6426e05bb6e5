"""Checks that every node of an allocation can take part, before any accelerator time is
spent. Run as one task per node (slurm/pretrain_1b.sh does):

    srun --ntasks-per-node=1 --ntasks=$SLURM_NNODES python -m launch.preflight [--expect-gpus N]

Node 0 hosts a TCP store at MASTER_ADDR:(MASTER_PORT+1) (the training rendezvous keeps
MASTER_PORT); every node joins it and reports its host name, code revision and visible
accelerators; node 0 compares and every node exits with its verdict:

- MASTER_ADDR must resolve and be an address of node 0 (else nobody can rendezvous there);
- every node must reach it within --timeout seconds;
- every node must run the same code (a hash of the source files, so a stale copy on one
  node's local disk is caught even without git);
- every node must see --expect-gpus accelerators (0: no check).

Exit 0 when all pass; otherwise 3 (pretrain/errors.py EXIT_PREFLIGHT: the batch script stops
without a requeue), node 0 printing one line that names each problem's node and the fix.
The config, the data and the run directory are checked separately, on the batch node, by
`python -m pretrain.train --dry-run --world-size N` (no accelerator needed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from pretrain.errors import EXIT_PREFLIGHT, PreflightError, report

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pretrain", "launch", "data_tools", "configs", "slurm")


def code_revision(root: Path = REPO) -> str:
    """sha256 over the relative paths and contents of the source files."""
    digest = hashlib.sha256()
    for top in SOURCE_DIRS:
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml", ".sh") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPUs
        return 0


def check_master_is_local(addr: str) -> str | None:
    """On node 0: None when MASTER_ADDR is one of this machine's addresses."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"MASTER_ADDR={addr} does not resolve ({err.strerror}); set it to node 0's host name or IP"
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((sockaddr[0], 0))  # binding succeeds only on a local address
                return None
            except OSError:
                continue
    return (f"MASTER_ADDR={addr} ({infos[0][4][0]}) is not an address of node 0 "
            f"({socket.gethostname()}); no rank could rendezvous there. Set MASTER_ADDR to "
            f"node 0's name on the training network, or leave it unset")


def main(argv=None) -> int:
    """0 when every node agrees; EXIT_PREFLIGHT (3) with one line on node 0 otherwise (the
    other nodes exit 3 quietly: node 0 has said why)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-gpus", type=int, default=0, help="accelerators per node (0: no check)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every node")
    args = parser.parse_args(argv)
    try:
        return check_nodes(args)
    except PreflightError as err:
        return report(err)


def check_nodes(args) -> int:

    from launch.env import master_addr, master_port

    node = int(os.environ.get("SLURM_NODEID", os.environ.get("SLURM_PROCID", "0")))
    nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_NTASKS", "1")))
    addr, port = master_addr(), master_port() + 1
    host = socket.gethostname()
    me = {"host": host, "revision": code_revision(), "gpus": visible_gpus()}

    if node == 0:
        problem = check_master_is_local(addr)
        if problem:
            raise PreflightError(problem)
    from torch.distributed import TCPStore

    try:
        store = TCPStore(addr, port, world_size=nodes, is_master=(node == 0),
                         timeout=timedelta(seconds=args.timeout), wait_for_workers=False)
    except Exception as err:  # noqa: BLE001 - refused, timed out, unresolvable
        raise PreflightError(f"node {node} ({host}) cannot reach MASTER_ADDR={addr} port {port} within "
                    f"{args.timeout:.0f} s ({str(err).splitlines()[0][:200]}); check that the "
                    f"name resolves to node 0 on a network every node can reach")
    store.set(f"node/{node}", json.dumps(me))
    reported = nodes
    if node == 0:
        try:
            store.wait([f"node/{i}" for i in range(nodes)], timedelta(seconds=args.timeout))
        except Exception:  # noqa: BLE001
            seen = [i for i in range(nodes) if store.check([f"node/{i}"])]
            missing = sorted(set(range(nodes)) - set(seen))
            reported = len(seen)
            store.set("verdict", json.dumps([f"nodes {missing} did not report within "
                                             f"{args.timeout:.0f} s"]))
        else:
            reports = [json.loads(store.get(f"node/{i}")) for i in range(nodes)]
            problems = []
            for i, rep in enumerate(reports):
                if rep["revision"] != me["revision"]:
                    problems.append(
                        f"node {i} ({rep['host']}) runs code revision {rep['revision']}, node 0 "
                        f"({host}) runs {me['revision']}: put the same checkout on every node")
                if args.expect_gpus and rep["gpus"] != args.expect_gpus:
                    problems.append(
                        f"node {i} ({rep['host']}) sees {rep['gpus']} GPUs, the job expects "
                        f"{args.expect_gpus}: check --gpus-per-node and CUDA_VISIBLE_DEVICES")
            store.set("verdict", json.dumps(problems))
    verdict = json.loads(store.get("verdict"))
    # Node 0 leaves last: its store must outlive every other node's read of the verdict. Only
    # the nodes that reported read it (one that never reached the store has already failed),
    # and a node that dies between report and read holds node 0 for --timeout at most.
    store.add("done", 1)
    if node == 0:
        deadline = time.monotonic() + args.timeout
        while int(store.add("done", 0)) < reported and time.monotonic() < deadline:
            time.sleep(0.05)
    if verdict:
        if node == 0:
            raise PreflightError("; ".join(verdict))
        return EXIT_PREFLIGHT
    if node == 0:
        print(f"preflight: {nodes} node(s) ok: code {me['revision']}, {me['gpus']} GPU(s) on "
              f"node 0, rendezvous {addr}:{port - 1}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
