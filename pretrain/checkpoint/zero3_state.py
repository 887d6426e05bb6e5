"""ZeRO-3 weights and Adam state in model space: the same full, layout-free tensors that
optimizer_state.py writes for stages 0-2, so checkpoints move freely between the stages.

Stage 3 partitions every parameter on its own: `param.ds_tensor` holds this DP rank's
contiguous 1/DP slice of the flattened (TP-local) tensor, padded at the end to equal
slices, and `param.data` is an empty placeholder outside forward/backward. The fp32 master
slices and Adam's moments live in one flat buffer per sub-group
(`optimizer.fp32_partitioned_groups_flat`). DeepSpeed's tensor-fragment API
(`safe_get/set_full_fp32_param`, `safe_get/set_full_optimizer_state`) reads and writes a
parameter's full fp32 state through those buffers: one all-gather per parameter and state
on save, none on load. The weights slices are gathered and cut the same way here.

Cost: as for stages 1/2, each rank holds the full (TP-local) weights and optimizer state
in host memory for the save; device memory grows by one parameter at a time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

from pretrain.checkpoint.optimizer_state import MASTER, MOMENTS, OptimizerState


def is_zero3(opt) -> bool:
    return hasattr(opt, "fp32_partitioned_groups_flat")


def for_engine(engine) -> OptimizerState:
    """The model-space view of `engine`'s optimizer state for its ZeRO stage."""
    return Zero3OptimizerState(engine) if is_zero3(engine.optimizer) else OptimizerState(engine)


def _gather_full(param, partition: torch.Tensor) -> torch.Tensor:
    """The full tensor of which `partition` is this rank's stage-3 slice, on the host."""
    group = param.ds_process_group
    world = dist.get_world_size(group)
    local = partition.detach().contiguous().reshape(-1)
    flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(flat, local, group=group)
    return flat[:param.ds_numel].view(param.ds_shape).to("cpu", copy=True)


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full` as stage 3 lays it out: padding past the end is zero."""
    size = param.ds_tensor.numel()
    lo = dist.get_rank(param.ds_process_group) * size
    out = torch.zeros(size, dtype=full.dtype)
    flat = full.reshape(-1)
    if lo < flat.numel():
        piece = flat[lo:lo + size]
        out[:piece.numel()] = piece
    return out


class Zero3OptimizerState(OptimizerState):
    """OptimizerState over DeepSpeed's stage-3 optimizer (and the weights it partitions,
    which stages 0-2 leave whole in the model)."""

    def __init__(self, engine):
        # Not super().__init__(): it maps stage 0-2's flat buffers, which stage 3 has not.
        self.engine = engine
        self.opt = engine.optimizer
        self.groups = None
        self.inner = self.opt.optimizer  # the torch optimizer stepping the fp32 flats

    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.opt.fp16_groups for p in group]

    def _has_moments(self) -> bool:
        """Adam creates its state at the first step; before it the moments are zero."""
        return all(name in self.inner.state.get(flat, {}) for flat in
                   self.opt.fp32_partitioned_groups_flat for name in MOMENTS)

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def full_weights(self, gather: bool):
        """Inside: every parameter's `.data` is a full host tensor (its gathered value, or
        uninitialised when `gather` is false, for a load to fill), so megatron's
        sharded_state_dict sees real shapes. Yields {id(param): that host tensor}. On exit
        DeepSpeed's empty placeholders are put back; after a load (`gather` false) the host
        values are first installed as this rank's weight and fp32 master slices."""
        params = self.params()
        placeholders = [p.data for p in params]
        host = {}
        for p in params:
            host[id(p)] = (_gather_full(p, p.ds_tensor) if gather
                           else torch.empty(p.ds_shape, dtype=p.dtype))
        failed = False
        try:
            for p in params:
                p.data = host[id(p)]
            yield host
        except BaseException:
            failed = True
            raise
        finally:
            for p, placeholder in zip(params, placeholders):
                p.data = placeholder
            if not gather and not failed:
                self._install_weights(params, host)

    def _install_weights(self, params, host: dict) -> None:
        with torch.no_grad():
            for p in params:
                full = host[id(p)]
                p.ds_tensor.data.copy_(_local_slice(p, full).to(p.ds_tensor.device, p.ds_tensor.dtype))
                # Master := weights; a saved fp32 master copy replaces it in scatter().
                safe_set_full_fp32_param(p, full.to(p.ds_tensor.device, torch.float32))

    def reset_master_from_weights(self) -> None:
        """Nothing to do: installing the weights (full_weights) already set the master."""

    # ------------------------------------------------------------------ save
    def gather(self, host=None) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """Every param's full (TP-local) state on the CPU, identical on every DP rank.
        `host` is not used: these are fresh host tensors already (an async save's staging
        copies them once more)."""
        moments = self._has_moments()
        out = {}
        for p in self.params():
            state = {}
            for name in self.names():
                if name == MASTER:
                    value = safe_get_full_fp32_param(p)
                elif moments:
                    value = safe_get_full_optimizer_state(p, name)
                else:
                    value = torch.zeros(p.ds_shape)
                state[name] = value.detach().to("cpu", torch.float32, copy=True)
            out[p] = state
        return out

    # ------------------------------------------------------------------ load
    def scatter(self, states: dict, step: int) -> None:
        """Install model-space state (from `empty()`, filled by a load) into this rank's
        slices. Call after the weights are installed: without a saved master copy the
        master stays the weights."""
        for flat in self.opt.fp32_partitioned_groups_flat:
            state = self.inner.state.setdefault(flat, {})
            for name in MOMENTS:
                if name not in state:
                    state[name] = torch.zeros_like(flat)
            state["step"] = torch.tensor(float(step))
        for p in self.params():
            device = p.ds_tensor.device
            for name, value in states[p].items():
                if name == MASTER:
                    safe_set_full_fp32_param(p, value.to(device))
                else:
                    safe_set_full_optimizer_state(p, value.to(device), name)
