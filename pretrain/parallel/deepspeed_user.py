"""The DeepSpeed config of a run: ours (`deepspeed_config`), with the user's keys
(`parallel.deepspeed`) refused where our batch, precision and optimizer contract owns them,
merged over our defaults, and checked by DeepSpeed's own parser.

Checked before any process group exists (train.py), so a typo is one line and exit 2, not
a traceback from inside `deepspeed.initialize` on every rank.
"""

from __future__ import annotations

import logging

from pretrain.config import ConfigError, deep_merge
from pretrain.parallel import REDUCE_BUCKET_ELEMENTS

# Keys this project sets from its own config, with the reason and the key to use instead.
# The schedule owns the micro-batch loop and calls autograd itself (zero.py), checkpoints
# store the Adam state of our torch AdamW in parameter shape, and the LR schedule is a
# LambdaLR the checkpoint saves: a DeepSpeed optimizer or scheduler would bypass all three.
OWNED = {
    "train_micro_batch_size_per_gpu": "the micro-batch is ours; set train.micro_batch_size",
    "train_batch_size": "the global batch is ours; set train.global_batch_size",
    "gradient_accumulation_steps": "megatron's schedule accumulates (global_batch_size / "
                                   "(micro_batch_size x DP) micro-batches); set "
                                   "train.global_batch_size",
    "managed_gradient_accumulation": "megatron's schedule owns the accumulation boundary; set "
                                     "train.global_batch_size",
    "bf16": "precision is ours; set parallel.precision (auto/bf16/fp32)",
    "fp16": "fp16 with loss scaling is not supported; set parallel.precision=bf16",
    "torch_autocast": "precision is ours; set parallel.precision (auto/bf16/fp32)",
    "gradient_clipping": "clipping is ours (it counts TP/PP-shared weights once); set "
                         "optim.grad_clip",
    "optimizer": "the optimizer is our AdamW, whose state checkpoints save in parameter "
                 "shape; set optim.lr, optim.beta1, optim.beta2, optim.eps, optim.weight_decay",
    "scheduler": "the LR schedule is ours and is checkpointed; set optim.schedule, "
                 "optim.warmup_steps, optim.min_lr",
    "checkpoint": "checkpoints are ours (pretrain/checkpoint, not DeepSpeed's); set "
                  "checkpoint.*",
    "zero_optimization.stage": "the ZeRO stage is ours; set parallel.zero_stage",
}

_OFFLOAD_DEVICES = ("cpu", "nvme")


def refuse_owned(user: dict, zero_stage: int) -> None:
    """One ConfigError for the first key of `user` our contract owns, or that cannot apply."""
    zero = user.get("zero_optimization")
    for dotted, why in OWNED.items():
        head, _, leaf = dotted.partition(".")
        present = (isinstance(zero, dict) and leaf in zero) if leaf else head in user
        if present:
            raise ConfigError(f"parallel.deepspeed.{dotted} is refused: {why}")
    if zero is not None and not isinstance(zero, dict):
        raise ConfigError(f"parallel.deepspeed.zero_optimization={zero!r} must be a mapping, "
                          f"e.g. {{overlap_comm: true}}")
    if zero_stage == 0 and _offloads_optimizer(user):
        raise ConfigError("parallel.deepspeed.zero_optimization.offload_optimizer needs "
                          "parallel.zero_stage 1 or 2 (stage 0 has no optimizer partition to "
                          "offload and DeepSpeed would ignore it); raise parallel.zero_stage")
    if user.get("zero_force_ds_cpu_optimizer") is True and _offloads_optimizer(user):
        raise ConfigError("parallel.deepspeed.zero_force_ds_cpu_optimizer=true needs "
                          "DeepSpeedCPUAdam, which is a JIT-compiled op this project does not "
                          "build; drop the key (offload then steps our torch AdamW on the CPU)")


def _offloads_optimizer(config: dict) -> bool:
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer")
    return isinstance(offload, dict) and offload.get("device") in _OFFLOAD_DEVICES


def merge(defaults: dict, user: dict) -> dict:
    """`user` deep-merged over our `defaults` (after refuse_owned). Optimizer offload keeps our
    torch AdamW, stepping on the CPU copy: DeepSpeed would insist on its DeepSpeedCPUAdam, a
    C++ op compiled at run time, which this project never builds."""
    if not user:
        return defaults
    merged = deep_merge(defaults, user)
    if _offloads_optimizer(merged):
        merged.setdefault("zero_force_ds_cpu_optimizer", False)
    return merged


def describe(engine, user: dict) -> str:
    """What the built ZeRO optimizer actually does with the user's keys, for the run log."""
    optimizer = engine.optimizer
    offload = "cpu" if getattr(optimizer, "cpu_offload", False) else "off"
    overlap = "on" if getattr(optimizer, "overlap_comm", False) else "off"
    return (f"deepspeed: parallel.deepspeed keys {', '.join(sorted(user))} merged; ZeRO "
            f"optimizer offload {offload}, overlap_comm {overlap}")


class _ReadKeys(dict):
    """A dict that records which keys were read: the top-level keys DeepSpeed's parser never
    reads are ones it ignores silently (a misspelt section, a key of another version)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.__dict__["read"] = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)


class _DataParallelSize:
    """What DeepSpeedConfig asks the mpu before process groups exist: the DP size."""

    def __init__(self, size: int):
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def deepspeed_config(zero_stage: int, micro_batch_size: int, grad_clip: float, bf16: bool,
                     user: dict | None = None) -> dict:
    """Our DeepSpeed config, with the user's `parallel.deepspeed` keys merged over it (keys
    the schedule/ZeRO contract of zero.py owns are refused: `refuse_owned`)."""
    if user:
        refuse_owned(user, zero_stage)
    zero = {"stage": zero_stage}
    if zero_stage >= 1:
        # Deterministic reductions: no overlapped bucketing races, contiguous gradient buffers.
        # parallel.deepspeed may turn overlap_comm on and resize the buckets.
        zero.update({"overlap_comm": False, "contiguous_gradients": True,
                     "reduce_scatter": True, "allgather_partitions": True,
                     "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
                     "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS})
    if zero_stage == 3:
        # Small models in tests: keep every parameter partitioned rather than persisted whole.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9,
                     "stage3_prefetch_bucket_size": REDUCE_BUCKET_ELEMENTS})
    return merge({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }, user or {})


def check(cfg, data_parallel: int, bf16: bool) -> dict:
    """The DeepSpeed config this run will use, refused or checked as above (ConfigError)."""
    user = cfg.parallel.deepspeed
    merged = deepspeed_config(cfg.parallel.zero_stage, cfg.train.micro_batch_size,
                              cfg.optim.grad_clip, bf16, user)
    if user:
        check_with_deepspeed(merged, user, data_parallel)
    return merged


def check_with_deepspeed(merged: dict, user: dict, data_parallel: int) -> None:
    """Parse `merged` with DeepSpeed's own config classes (its pydantic models forbid unknown
    nested keys); raise one ConfigError naming the user's key on the first problem."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its config parse logs the world size at INFO
    seen = _ReadKeys(merged)
    try:
        DeepSpeedConfig(seen, mpu=_DataParallelSize(data_parallel))
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        # The section whose model failed: the one DeepSpeed read last, if it holds the key.
        sections = ([seen.read[-1]] if seen.read else []) + list(user)
        section = next((key for key in sections if isinstance(merged.get(key), dict)
                        and (not loc or loc[0] in merged[key])), sections[0] if sections else "?")
        where = ".".join(["parallel.deepspeed", section, *loc])
        raise ConfigError(f"{where}={first.get('input')!r}: {first['msg']} (DeepSpeed's "
                          f"{err.title}); check the spelling against DeepSpeed's config "
                          f"docs") from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"parallel.deepspeed: DeepSpeed rejects it: {message}") from None
    finally:
        ds_logger.setLevel(level)
    ignored = [key for key in user if key not in seen.read]
    if ignored:
        raise ConfigError(f"parallel.deepspeed.{ignored[0]} is not a key DeepSpeed reads (it "
                          f"would be ignored); check the spelling against DeepSpeed's config "
                          f"docs")
