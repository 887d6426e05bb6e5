"""Run megatron-core's CUDA-only code paths on CPU, for CI and development boxes.

megatron-core 0.16 assumes a CUDA device in a handful of places that the training path hits
even when every tensor lives on the CPU. `enable()` redirects exactly these, and only when
CUDA is absent (on a GPU machine it does nothing):

1. `torch.cuda.current_device()` is used as the `device=` of buffers (p2p shape exchange,
   vocab-parallel embedding scratch). It returns "cpu" here.
2. `torch.cuda.synchronize()` is called after p2p sends in the pipeline schedules. On CPU,
   gloo's blocking ops are already synchronous, so it is a no-op.
3. The model-parallel RNG tracker (`tensor_parallel.random`) forks "the CUDA generator" so
   that dropout differs across TP ranks but matches across DP ranks. On CPU the generator
   that dropout actually draws from is the CPU default generator, so the tracker's
   get/set/seed functions are pointed at it. The tracker's semantics are unchanged:
   inside `fork()` the CPU generator holds the TP-rank-specific state, outside it the
   data-parallel one. (megatron warns when the CPU generator moves inside a fork, which on
   CPU is every dropout draw by construction; that one message is filtered.)
4. `Tensor.cuda()` is called on the tied output-embedding copy of the last pipeline stage
   before its first all-reduce. It returns the tensor unchanged.
5. Tensors created inside the schedules with `device="cuda"` (token counters). A
   `TorchFunctionMode` rewrites a CUDA `device=` argument of tensor factories to "cpu".
   The mode is entered per call of the forward-backward function (`cpu_device_mode()`),
   not globally, so it cannot hide a real device bug elsewhere.

Nothing here changes numerics: every redirected call either placed memory or moved RNG
state, and the CPU equivalents do the same on the CPU.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def enable() -> bool:
    """Install the redirects when CUDA is absent. Idempotent; returns whether active."""
    global _ENABLED
    if cuda_available():
        return False
    if _ENABLED:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.manual_seed_all = _cpu_manual_seed
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    _ENABLED = True
    return True


def is_enabled() -> bool:
    return _ENABLED


_FACTORY_NAMES = {
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` (or an integer device) on tensor factories to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _FACTORY_NAMES and _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cpu_device_mode():
    """Context manager: CUDA `device=` arguments land on the CPU while CUDA is absent."""
    if not _ENABLED:
        return contextlib.nullcontext()
    return _CudaToCpuMode()
