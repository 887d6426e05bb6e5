"""Rank-0 console logging and the per-step metrics file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import warnings

import torch.distributed as dist

# Notices that do not apply to this system: megatron announcing Apex/TE fallbacks (spec.py
# picks the backend explicitly) and a deprecated torch API that DeepSpeed calls.
_IRRELEVANT_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*all_gather_into_tensor. is deprecated.*",
    r".*_reduce_scatter_base. is a private function.*",
    # megatron's torch_dist checkpoint strategy still goes through these torch.distributed
    # .checkpoint entry points; the files it writes are the supported format.
    r".*`load_state_dict` is deprecated and will be removed.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    # checkpoint/weights.py reads a checkpoint on one process on purpose (no_dist=True).
    r".*torch.distributed is disabled, unavailable or uninitialized.*",
)


def quiet_library_warnings() -> None:
    for pattern in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    """Print on global rank 0 only; other ranks stay quiet unless they fail."""
    if is_rank0():
        print(message, flush=True)


def warn(message: str) -> None:
    if is_rank0():
        print(f"warning: {message}", file=sys.stderr, flush=True)


class MetricsWriter:
    """Appends one JSON object per logged step to RUN/metrics.jsonl (rank 0)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if is_rank0() else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: after a resume from step N the steps after N are
        trained again, and the file keeps one record per step."""
        if self._file is None:
            return
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
