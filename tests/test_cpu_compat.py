"""pretrain.parallel.cpu: megatron-core's CUDA-only calls redirected to the CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pretrain.parallel import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU redirects are inactive on a CUDA machine")

TP_SEED_OFFSET = 2718  # megatron: tensor-model-parallel seed = seed + 2718 + tp_rank


def _draws(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tracker(single_rank_parallel):
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def test_enable_redirects_cuda_calls(single_rank_parallel):
    assert cpu.enable() is True  # idempotent
    assert cpu.is_enabled()
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.synchronize() is None
    t = torch.ones(2)
    assert t.cuda() is t
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())


def test_cuda_manual_seed_seeds_the_cpu_generator(single_rank_parallel):
    torch.cuda.manual_seed(77)
    assert torch.equal(torch.rand(4), _draws(77, 4))


def test_model_parallel_seed_resets_cpu_generator(tracker):
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    torch.rand(10)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    # the data-parallel ("default") stream is the CPU generator seeded with the seed itself
    assert torch.equal(torch.rand(5), _draws(123, 5))


def test_fork_switches_and_restores_cpu_generator(tracker):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    before = torch.rand(5)
    with tracker.fork():
        inside = torch.rand(5)
    after = torch.rand(5)

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    reference = torch.rand(10)  # the same stream without the fork
    assert torch.equal(torch.cat([before, after]), reference)
    # inside the fork the CPU generator holds the tensor-parallel stream (TP rank 0)
    assert torch.equal(inside, _draws(123 + TP_SEED_OFFSET, 5))
    assert not torch.equal(inside, reference[5:])


def test_consecutive_forks_advance_the_tracked_stream(tracker):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        first = torch.rand(5)
    outside = torch.rand(3)
    with tracker.fork():
        second = torch.rand(5)
    assert not torch.equal(first, second)
    # one continuous stream across the two forks, untouched by the draw in between
    assert torch.equal(torch.cat([first, second]), _draws(123 + TP_SEED_OFFSET, 10))
    assert torch.equal(outside, _draws(123, 3))


def test_dropout_inside_fork_is_reproducible(tracker):
    from megatron.core import tensor_parallel

    x = torch.ones(64)
    masks = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        with tracker.fork():
            masks.append(torch.nn.functional.dropout(x, p=0.5, training=True))
    assert torch.equal(masks[0], masks[1])
    assert (masks[0] == 0).any() and (masks[0] != 0).any()


def test_cpu_device_mode_rewrites_cuda_factories(single_rank_parallel):
    with cpu.cpu_device_mode():
        zeros = torch.zeros(3, device="cuda")
        ones = torch.ones(2, device=torch.device("cuda", 0))
        arange = torch.arange(4, device=0)
        full = torch.full((2,), 7.0, device="cuda:0")
        like = torch.zeros_like(zeros, device="cuda")
    for t in (zeros, ones, arange, full, like):
        assert t.device.type == "cpu"
    assert torch.equal(zeros, torch.zeros(3))
    assert torch.equal(arange, torch.arange(4))
    assert torch.equal(full, torch.full((2,), 7.0))


def test_cuda_factories_fail_outside_the_mode(single_rank_parallel):
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(3, device="cuda")


def test_cpu_device_mode_is_a_no_op_when_disabled(monkeypatch):
    monkeypatch.setattr(cpu, "_ENABLED", False)
    assert isinstance(cpu.cpu_device_mode(), contextlib.nullcontext)
