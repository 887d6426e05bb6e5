"""Adam state in model space: one tensor per parameter and state, shaped like the
(TP-local) parameter, whatever DeepSpeed does with it internally.

DeepSpeed's ZeRO-1/2 (and its BF16_Optimizer) flatten each parameter group into one
aligned buffer, cut it into equal per-DP-rank partitions and keep fp32 master weights and
Adam moments for the local partition only. Its own checkpoints store those partitions,
which fixes the DP size, and its "universal" conversion is an offline step. Here the
partitions are gathered over the DP group at save time and cut out of the model-shaped
tensors again at load time, so the same checkpoint loads under any DP size and ZeRO stage
(and, through megatron's sharded tensors, any TP/PP layout). Megatron's distributed
optimizer does the same in its "fully_reshardable" format.

Cost of the gather: each rank briefly holds the full optimizer state of its TP/PP shard
(12 bytes per parameter with master weights), in host memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Names as they appear in the checkpoint (optimizer.state.NAME.<model key>).
MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32_param"


@dataclass
class FlatGroup:
    """One DeepSpeed parameter group: model params viewing one flat buffer, and this rank's
    fp32 partition of it (the tensor the wrapped torch optimizer steps)."""

    params: list
    flat: torch.Tensor
    partition: torch.Tensor
    group: object  # DP process group
    offsets: list  # element offset of each param in `flat`


def _flat_groups(opt) -> list[FlatGroup] | None:
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        params, flats, parts = opt.bit16_groups, opt.bit16_groups_flat, opt.single_partition_of_fp32_groups
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 + ZeRO-0/1)
        params, flats, parts = opt.bf16_groups, opt.bf16_groups_flat, opt.fp32_groups_flat_partition
    else:
        return None
    groups = []
    for i, (ps, flat, part) in enumerate(zip(params, flats, parts)):
        offsets = []
        for p in ps:
            offset, rem = divmod(p.data_ptr() - flat.data_ptr(), p.element_size())
            if rem or offset < 0 or offset + p.numel() > flat.numel():
                raise RuntimeError(f"parameter of shape {tuple(p.shape)} does not view DeepSpeed's "
                                   f"flat buffer of group {i}; this DeepSpeed version lays "
                                   f"ZeRO buffers out differently than pretrain/checkpoint expects")
            offsets.append(offset)
        dp_group = opt.real_dp_process_group[i]
        if flat.numel() != part.numel() * dist.get_world_size(dp_group):
            raise RuntimeError(f"ZeRO group {i}: flat buffer of {flat.numel()} elements is not "
                               f"{dist.get_world_size(dp_group)} partitions of {part.numel()}")
        groups.append(FlatGroup(list(ps), flat, part, dp_group, offsets))
    return groups


class OptimizerState:
    """Read and write Adam state of a DeepSpeed engine's optimizer in model space."""

    def __init__(self, engine):
        self.engine = engine
        self.opt = engine.optimizer
        self.groups = _flat_groups(self.opt)
        if self.groups is None and not isinstance(self.opt, torch.optim.Optimizer):
            raise RuntimeError(f"checkpointing does not know DeepSpeed's optimizer "
                               f"{type(self.opt).__name__}; use parallel.zero_stage 0-3")
        # The torch optimizer that holds Adam's state: DeepSpeed's wrapped one, or (ZeRO-0
        # fp32) the client optimizer itself.
        self.inner = self.opt.optimizer if self.groups is not None else self.opt

    # ------------------------------------------------------------------ which params
    def params(self) -> list[torch.nn.Parameter]:
        if self.groups is not None:
            return [p for g in self.groups for p in g.params]
        return [p for group in self.inner.param_groups for p in group["params"]]

    @property
    def has_master(self) -> bool:
        """Whether fp32 master weights exist apart from the model weights (bf16 training)."""
        return any(p.dtype != torch.float32 for p in self.params())

    def names(self) -> tuple[str, ...]:
        return MOMENTS + ((MASTER,) if self.has_master else ())

    @contextlib.contextmanager
    def full_weights(self, gather: bool):
        """Stages 0-2 keep every parameter whole in the model: nothing to gather or install
        (ZeRO-3's counterpart swaps full host tensors in). Yields {id(param): host tensor}."""
        yield {}

    # ------------------------------------------------------------------ save
    def gather(self, host=None) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """Every param's full (TP-local) state, on the CPU, identical on every DP rank.
        Zeros before the first step (Adam's initial moments).

        `host(key, tensor)`: copies each param's state into a reused host buffer
        (staging.py, async saves); default: one fresh host copy per flat buffer, the
        param's state being views of it."""
        out: dict = {}
        if self.groups is None:  # ZeRO-0 fp32: torch's optimizer holds per-param state
            for p in self.params():
                state = self.inner.state.get(p, {})
                out[p] = {name: (state[name] if name in state else torch.zeros_like(p))
                          .detach().to("cpu", torch.float32, copy=True) for name in MOMENTS}
            return out
        for g in self.groups:
            world = dist.get_world_size(g.group)
            state = self.inner.state.get(g.partition, {})
            flats = {}
            for name in self.names():
                local = g.partition if name == MASTER else state.get(name)
                if local is None:
                    local = torch.zeros_like(g.partition)
                local = local.detach().float().contiguous()
                if world == 1:
                    flat = local
                else:
                    # An offloaded partition lives in host memory, but the DP group (NCCL on
                    # GPU) communicates on the device of the model's flat buffer.
                    local = local.to(g.flat.device)
                    flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
                    dist.all_gather_into_tensor(flat, local, group=g.group)
                # One host copy per buffer; the per-parameter tensors below are views of it.
                # (On CPU with DP=1 this aliases the live state, which is not modified before
                # the save has read it: synchronously, or in a forked writer's snapshot.)
                flats[name] = flat if host is not None else flat.cpu()
            for p, offset in zip(g.params, g.offsets):
                out[p] = {name: flat[offset:offset + p.numel()].view(p.shape)
                          for name, flat in flats.items()}
                if host is not None:
                    out[p] = {name: host(("optimizer", id(p), name), view)
                              for name, view in out[p].items()}
        return out

    def step_count(self) -> int:
        for state in self.inner.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    # ------------------------------------------------------------------ load
    def empty(self, with_master: bool) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        names = MOMENTS + ((MASTER,) if with_master else ())
        # ZeRO-3 has emptied param.data; ds_shape keeps the parameter's shape.
        return {p: {name: torch.empty(getattr(p, "ds_shape", p.shape), dtype=torch.float32)
                    for name in names} for p in self.params()}

    def scatter(self, states: dict, step: int) -> None:
        """Install model-space state (from `empty()`, filled by a load): this rank's slice
        of each flat buffer. Master weights come from the state when present, else from
        the model weights already loaded into the params."""
        if self.groups is None:
            for p in self.params():
                st = self.inner.state.setdefault(p, {})
                for name in MOMENTS:
                    st[name] = states[p][name].to(p.device, p.dtype).clone()
                st["step"] = torch.tensor(float(step))
            return
        for g in self.groups:
            rank, size = dist.get_rank(g.group), g.partition.numel()
            lo, hi = rank * size, (rank + 1) * size
            state = self.inner.state.setdefault(g.partition, {})
            # Master weights are always installed: from the saved copy, else from the weights.
            for name in MOMENTS + (MASTER,):
                # Only this rank's range [lo, hi) of the flat buffer is built: the parameters
                # overlapping it contribute their overlap; alignment padding stays zero.
                local = torch.zeros(size, dtype=torch.float32)
                for p, offset in zip(g.params, g.offsets):
                    a, b = max(offset, lo), min(offset + p.numel(), hi)
                    if a >= b:
                        continue
                    source = states[p].get(name)
                    if source is None:  # no separate master copy saved: the weights are it
                        source = p.detach()
                    local[a - lo:b - lo] = source.reshape(-1)[a - offset:b - offset].float().cpu()
                local = local.to(g.partition.device)
                if name == MASTER:
                    g.partition.data.copy_(local)
                else:
                    state[name] = local
            state["step"] = torch.tensor(float(step))

    def reset_master_from_weights(self) -> None:
        """After a weights-only load: master partitions := the loaded model weights."""
        if self.groups is None:
            return
        for g in self.groups:
            rank, size = dist.get_rank(g.group), g.partition.numel()
            g.partition.data.copy_(g.flat[rank * size:(rank + 1) * size].float())

