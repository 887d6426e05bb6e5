"""DeepSpeed ZeRO as the optimizer-sharding layer over megatron's data-parallel group.

Contract with the pipeline schedule: megatron's schedule owns the micro-batch loop (it
scales each micro-batch loss by 1/num_micro_batches and calls autograd itself), so the
engine runs with gradient_accumulation_steps=1 and `managed_gradient_accumulation: false`:
every backward only accumulates locally (ZeRO-2/3 reduce-scatter as gradients arrive), and
`engine.step()` is the one accumulation boundary, where the remaining reduction, the
global-norm clipping and the sharded AdamW update happen.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core import parallel_state



class MegatronMPU:
    """The `mpu` interface DeepSpeed queries, answered from megatron's parallel_state.

    DeepSpeed computes the global gradient norm by summing squared norms of TP-sharded
    parameters on every TP rank and of replicated ones on TP rank 0 only, then all-reducing
    over the data-parallel group and the "model-parallel" group. That group must span both
    TP and PP (so every stage contributes), while the "model-parallel rank" it tests must be
    the TP rank (so replicated norms/biases are counted once per stage).
    """

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return (parallel_state.get_tensor_model_parallel_world_size()
                * parallel_state.get_pipeline_model_parallel_world_size())


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 norm of gradients already reduced over data parallelism, clipped in place.

    Each distinct gradient is counted once: TP-sharded parameters on every TP rank,
    replicated ones on TP rank 0 only, and the last stage's tied-embedding copy
    (`ds_pipe_replicated`) not at all. The sum then runs over the TP x PP group.
    """
    grads, squares = [], []
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for param in params:
        if param.grad is None:
            continue
        grads.append(param.grad)
        if getattr(param, "ds_pipe_replicated", False):
            continue
        if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
            squares.append(param.grad.detach().float().pow(2).sum())
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    device = grads[0].device if grads else total.device
    total = total.to(device)
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        for grad in grads:
            grad.mul_(max_norm / (norm + 1e-6))
    return norm


class ZeroEngine:
    """The DeepSpeed engine plus the one number DeepSpeed does not record for stage 0."""

    def __init__(self, engine, stage0_norm: list | None):
        self.engine = engine
        self._stage0_norm = stage0_norm

    def step(self, skip: bool = False) -> bool:
        """The optimizer step, or none at all when a gradient is not finite or `skip` is
        given (a loss spike: every rank passes the same `skip`, decided from the all-reduced
        loss); returns whether the update was applied. ZeRO-1/2/3 skip through DeepSpeed's
        own overflow path (gradients dropped, Adam state and LR schedule untouched); stage 0
        applies the client optimizer unconditionally, so it is checked here first, with one
        flag all-reduced over every rank so that all skip together."""
        if self._stage0_norm is not None:
            if skip:
                self.engine.zero_grad()
                self._stage0_norm[0] = float("nan")  # not computed
                return False
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            bad = torch.zeros((), dtype=torch.float32,
                              device=params[0].grad.device if params else None)
            for param in params:
                bad = torch.maximum(bad, (~torch.isfinite(param.grad)).any().float())
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            if bad.item():
                self.engine.zero_grad()
                self._stage0_norm[0] = float("inf")
                return False
        if not skip:
            self.engine.step()
            return self.engine.was_step_applied()
        with forced_overflow(self.engine.optimizer):
            self.engine.step()
        if self.engine.was_step_applied():  # a DeepSpeed whose overflow path moved
            raise RuntimeError("DeepSpeed applied an update that was to be skipped: "
                               "parallel/zero.py's forced_overflow no longer reaches its "
                               "overflow check")
        return False

    def grad_norm(self) -> float:
        if self._stage0_norm is not None:
            return self._stage0_norm[0]
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


@contextmanager
def forced_overflow(optimizer):
    """Make a ZeRO optimizer's next step() take DeepSpeed's own overflow path: the global
    gradient norm it computes reads as infinite, so it drops the gradients and leaves the
    Adam state (and, in the engine, the LR schedule) untouched, as for a real overflow.
    The norm's collectives are skipped on every rank alike (all ranks skip together)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        name = "_get_norm_groups"  # stage 3: the per-group norms it combines

        def infinite(*_args, **_kwargs):
            return [torch.tensor(float("inf"))]
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        name = "scaled_global_norm"  # stage 1/2: checked with is_invalid_grad_norm

        def infinite(*_args, **_kwargs):
            return torch.tensor(float("inf"))
    else:
        raise RuntimeError(f"cannot skip an update of DeepSpeed's {type(optimizer).__name__}; "
                           f"use train.loss_spike_action=warn with this optimizer")
    setattr(optimizer, name, infinite)  # an instance attribute shadows the method
    try:
        yield
    finally:
        delattr(optimizer, name)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce.

    DeepSpeed's TorchBackend builds it on creation (under ~/.cache/torch_extensions) for
    `inference_all_reduce`, which this project never calls: all communication goes through
    torch.distributed. A process killed during that build leaves the build's `lock` file, and
    every later CPU run waited on it forever; two venvs at different paths rebuilt it in turn.
    Marking the op incompatible makes DeepSpeed skip it (comm/torch.py: build_shm_op)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def build_engine(model: torch.nn.Module, optimizer, lr_scheduler, ds_config: dict) -> ZeroEngine:
    import deepspeed

    skip_shm_comm_build()
    stage0_norm = None
    if ds_config["zero_optimization"]["stage"] == 0:
        # Stage 0 uses the client optimizer as is, and DeepSpeed's own clipping there counts the
        # tied embedding twice under PP and records no norm: clip in a pre-step hook instead,
        # after DeepSpeed's all-reduce and before AdamW.
        max_norm = ds_config["gradient_clipping"]
        ds_config = dict(ds_config, gradient_clipping=0.0)
        stage0_norm = [float("nan")]
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def clip_hook(_optimizer, _args, _kwargs):
            stage0_norm[0] = clip_grad_norm(params, max_norm)

        optimizer.register_step_pre_hook(clip_hook)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
        mpu=MegatronMPU(), dist_init_required=False)
    return ZeroEngine(engine, stage0_norm)
