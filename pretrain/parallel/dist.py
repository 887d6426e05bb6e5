"""Process-group setup from torchrun, SLURM or a plain single process, then megatron's
parallel_state (TP, PP, DP groups) and the model-parallel RNG seeds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"


def detect_env(environ=os.environ) -> ProcessEnv:
    """Rank and world size as the launcher set them. torchrun's variables win over SLURM's
    (torchrun inside an srun allocation sets both)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return ProcessEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                          int(environ.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return ProcessEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                          int(environ.get("SLURM_LOCALID", 0)), "slurm")
    return ProcessEnv(0, 1, 0, "single")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(env: ProcessEnv, timeout_minutes: int = 30) -> str:
    """Start torch.distributed (nccl with CUDA, gloo without). Returns the backend name."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        return dist.get_backend()
    # DeepSpeed (and torch's env:// init) read these; SLURM and plain launches do not set them.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank))
    if env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"launched by {env.launcher} with {env.world_size} ranks but "
                           f"MASTER_ADDR/MASTER_PORT are not set; export them (the SLURM script "
                           f"derives them from the allocation)")
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    return backend


def init_model_parallel(tp: int, pp: int, virtual_chunks: int, seed: int) -> None:
    """megatron parallel_state groups (order tp-dp-pp, megatron's default) and RNG seeds."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_chunks if virtual_chunks > 1 else None,
        create_gloo_process_groups=False,
    )
    # Same seed on every rank: parameters are initialized layout-independently (model/init.py)
    # and dropout inside TP regions draws from the tracker's per-TP-rank stream.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
