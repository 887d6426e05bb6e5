"""Measure what each rank really holds under DeepSpeed ZeRO: parameters, gradients and
optimizer state, in bytes of distinct storage.

Run under torchrun (or as one plain process):

    torchrun --standalone --nproc-per-node 2 tests/parity/zero_memory_probe.py \
        --out DIR [--config configs/smoke.yaml] [section.key=value ...]

It builds what the training CLI builds, with `pretrain.train.build()` (process groups ->
model -> optimizer -> ZeRO engine -> proxies -> loaders -> Trainer), trains `train.steps`
steps, and writes DIR/rank{R}.json on every rank.

What is counted, and when:

* Bytes are those of distinct storages (deduplicated by `untyped_storage().data_ptr()`),
  so a view into a flat buffer counts the buffer once, with its alignment padding.
* Parameters: after training, the storage behind every model parameter; under ZeRO-3
  the partition `param.ds_tensor` plus whatever full `param.data` is still gathered.
* Gradients: just before each `engine.step()` (hooked on the engine instance), i.e. after
  the whole global batch's backward, when the gradients of the step are all held: every
  `param.grad` plus DeepSpeed's own partitioned gradient buffers (ZeRO-2
  `grads_in_partition`, ZeRO-3 `grad_partitions_flat_buffer`). DeepSpeed's reduce-bucket
  staging buffers (`reduce_bucket_size` elements) are communication scratch space and are
  reported separately as `comm_buffer_bytes`.
* Optimizer state: after training, every tensor in the wrapped torch optimizer's `state`
  (Adam's exp_avg / exp_avg_sq and the step counters) plus the tensors it optimizes
  (DeepSpeed's fp32 master partitions). A master partition that shares storage with the
  model parameters (ZeRO-0; ZeRO-3 in fp32) is not a copy and is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))


class StorageSet:
    """Distinct storages, keyed by data pointer; each one's bytes counted once."""

    def __init__(self):
        self.sizes: dict[int, int] = {}

    def add(self, tensor) -> None:
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return
        self.sizes[storage.data_ptr()] = storage.nbytes()

    def add_all(self, tensors) -> None:
        for tensor in tensors:
            self.add(tensor)

    def without(self, *others: "StorageSet") -> "StorageSet":
        out = StorageSet()
        out.sizes = {k: v for k, v in self.sizes.items()
                     if not any(k in other.sizes for other in others)}
        return out

    def overlaps(self, other: "StorageSet") -> bool:
        return any(k in other.sizes for k in self.sizes)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def _tensors(value):
    """Tensors inside a (possibly nested) list/tuple/dict."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _ds_attr(zero_opt, name):
    """An attribute of a DeepSpeed ZeRO optimizer, also under Python's private-name mangling."""
    for candidate in (name, f"_{type(zero_opt).__name__}__{name.lstrip('_')}"):
        if hasattr(zero_opt, candidate):
            return getattr(zero_opt, candidate)
    return None


def inner_optimizer(engine):
    """The torch optimizer that actually updates: the client AdamW for stage 0, the AdamW
    DeepSpeed re-pointed at its flat partitions for stages 1-3."""
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else outer


def param_storages(model_params, stage: int) -> tuple[StorageSet, StorageSet, int]:
    """(partitioned/owned parameter storage, full gathered `param.data` storage, elements held)."""
    owned, gathered = StorageSet(), StorageSet()
    numel = 0
    for param in model_params:
        ds_tensor = getattr(param, "ds_tensor", None)
        if stage == 3 and ds_tensor is not None:
            owned.add(ds_tensor)
            numel += ds_tensor.numel()
            gathered.add(param.data)
        else:
            owned.add(param.data)
            numel += param.numel()
    return owned, gathered.without(owned), numel


def grad_storages(engine, model_params, stage: int) -> tuple[StorageSet, StorageSet]:
    """(gradient storage, reduce-bucket scratch storage) held right now."""
    zero_opt = engine.optimizer
    grads, comm = StorageSet(), StorageSet()
    for param in model_params:
        grads.add(param.grad)
        grads.add(getattr(param, "grad_accum", None))
    if stage in (1, 2):
        grads.add(getattr(zero_opt, "grads_in_partition", None))
        # Unmanaged accumulation keeps each backward's reduced partition in all_grad_tensors
        # (views into the grads_in_partition buffer of that backward) until step().
        grads.add_all(_tensors(getattr(zero_opt, "all_grad_tensors", {})))
        grads.add_all(_tensors(getattr(zero_opt, "averaged_gradients", {})))
        for part in getattr(zero_opt, "single_partition_of_fp32_groups", []):
            grads.add(part.grad)
    if stage == 3:
        grads.add(_ds_attr(zero_opt, "grad_partitions_flat_buffer"))
        for part in getattr(zero_opt, "fp32_partitioned_groups_flat", []):
            grads.add(part.grad)
    if stage >= 1:
        for bucket in (getattr(zero_opt, "ipg_buckets", None) or {}).values():
            comm.add_all(_tensors(getattr(bucket, "buffer", None)))
    return grads.without(comm), comm


def optimizer_storages(engine, owned_params: StorageSet) -> dict:
    inner = inner_optimizer(engine)
    masters, moments, scalars = StorageSet(), StorageSet(), StorageSet()
    # The tensors the optimizer updates: its param groups' and its state's keys (ZeRO-3 lists
    # its fp32 partitions in param_groups only while stepping, but keys its state by them).
    updated = {id(t): t for group in inner.param_groups for t in group["params"]}
    updated.update({id(t): t for t in inner.state if isinstance(t, torch.Tensor)})
    master_numel = 0
    for tensor in updated.values():
        masters.add(tensor)
        master_numel += tensor.numel()
    moment_numel = 0
    for state in inner.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 0:
                scalars.add(value)
            else:
                moments.add(value)
                moment_numel += value.numel()
    distinct_masters = masters.without(owned_params)
    moments = moments.without(owned_params, distinct_masters)
    scalars = scalars.without(owned_params, distinct_masters, moments)
    return {
        "optimizer_class": f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__name__}",
        "inner_optimizer_class": type(inner).__name__,
        "master_numel": master_numel,
        "master_aliases_params": masters.overlaps(owned_params),
        "master_bytes": distinct_masters.bytes,
        "moment_numel": moment_numel,
        "moment_bytes": moments.bytes,
        "scalar_state_bytes": scalars.bytes,
        "optimizer_bytes": distinct_masters.bytes + moments.bytes + scalars.bytes,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank{R}.json")
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from pretrain.config import load_config, validate
    from pretrain.data.build import open_data
    from pretrain.log import quiet_library_warnings
    from pretrain.parallel import dist as pdist
    from pretrain.train import build

    quiet_library_warnings()
    args = parse_args(argv)
    out = Path(args.out)
    env = pdist.detect_env()
    has_cuda = torch.cuda.is_available()
    cfg = load_config(args.config, args.overrides)
    validate(cfg, cuda=has_cuda)
    data = open_data(cfg)
    layout = validate(cfg, world_size=env.world_size, vocab_size=data.vocab_size, cuda=has_cuda)
    bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and has_cuda)

    # Exactly what the training CLI builds, without saves: only training is measured.
    cfg.checkpoint.interval, cfg.checkpoint.save_on_stop = 0, False
    built = build(cfg, layout, data, env, bf16)
    from megatron.core import parallel_state

    p, zero, trainer = cfg.parallel, built.zero, built.trainer
    model_params = [t for chunk in built.chunks for t in chunk.parameters()]
    # ZeRO-3 has emptied param.data by now; its ds_numel/ds_shape keep the real sizes.
    param_count = sum(getattr(t, "ds_numel", t.numel()) for t in model_params)
    # Element counts per optimizer group, in the order build_optimizer() groups them and
    # DeepSpeed flattens and partitions them: matrices (decayed), then vectors.
    shapes = [tuple(getattr(t, "ds_shape", t.shape)) for t in model_params]
    group_numels = [[math.prod(s) for s in shapes if len(s) >= 2],
                    [math.prod(s) for s in shapes if len(s) < 2]]

    engine = zero.engine
    stage = p.zero_stage
    snapshots = []
    real_step = engine.step

    def measured_step(*step_args, **step_kwargs):
        before, comm = grad_storages(engine, model_params, stage)
        result = real_step(*step_args, **step_kwargs)
        after, _ = grad_storages(engine, model_params, stage)
        snapshots.append({"grad_bytes": before.bytes, "comm_buffer_bytes": comm.bytes,
                          "grad_bytes_after_step": after.bytes})
        return result

    engine.step = measured_step  # instance attribute: the Trainer's call lands here
    try:
        trainer.fit()
    finally:
        trainer.close()

    owned, gathered, held_numel = param_storages(model_params, stage)
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "data_parallel": layout.data_parallel,
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "zero_stage": stage,
        "engine_zero_stage": int(engine.zero_optimization_stage()),
        "bf16": bf16,
        "vocab_size": data.vocab_size,
        "padded_vocab_size": layout.padded_vocab_size,
        "param_count": param_count,
        "group_param_numels": group_numels,
        "param_numel_held": held_numel,
        "param_bytes": owned.bytes,
        "gathered_param_bytes": gathered.bytes,
        "steps": [dict(s, loss=h["loss"]) for s, h in zip(snapshots, trainer.history)],
        **optimizer_storages(engine, owned),
    }
    last = snapshots[-1] if snapshots else {}
    record["grad_bytes"] = last.get("grad_bytes", 0)
    record["grad_bytes_after_step"] = last.get("grad_bytes_after_step", 0)
    record["comm_buffer_bytes"] = last.get("comm_buffer_bytes", 0)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env.rank}.json").write_text(json.dumps(record, indent=1))
    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
