"""Rank-0 console logging and the per-step metrics file."""

from __future__ import annotations

import sys
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
