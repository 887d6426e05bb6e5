"""Every cross-field check of a config, one function per section, run by `validate()`;
`check_run_dir` refuses a run directory that belongs to another run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import yaml

from pretrain.config.coerce import apply_override
from pretrain.config.layout import Layout, derive_layout
from pretrain.config.schema import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                   ModelConfig, OptimConfig)
from pretrain.errors import EXIT_HUNG, ConfigError
from pretrain.run_dir import CONFIG, RunDir


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _at_least_one(values: dict[str, int]) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")


def _not_negative(values: dict[str, float], note: str = "") -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must not be negative{note}")


def _check_model(m: ModelConfig) -> None:
    _at_least_one({"model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
                   "model.num_attention_heads": m.num_attention_heads,
                   "model.max_seq_length": m.max_seq_length,
                   "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by})
    _not_negative({"model.init_std": m.init_std, "model.vocab_size": m.vocab_size,
                   "model.num_query_groups": m.num_query_groups,
                   "model.ffn_hidden_size": m.ffn_hidden_size, "model.head_dim": m.head_dim})
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.hidden_size % m.num_attention_heads and not m.head_dim:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} does not divide "
                          f"model.hidden_size={m.hidden_size}; use one of {_divisors(m.hidden_size)}"
                          f" or set model.head_dim")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} does not divide "
                          f"model.num_attention_heads={m.num_attention_heads}; "
                          f"use one of {_divisors(m.num_attention_heads)}")
    if m.position_embedding == "rope" and m.kv_channels % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got {m.kv_channels} "
                          f"(model.head_dim, or hidden_size/heads); change model.head_dim or "
                          f"model.num_attention_heads")
    _check_rope_scaling(m)
    if m.position_embedding == "sinusoidal" and m.hidden_size % 2:
        raise ConfigError(f"sinusoidal positions need an even model.hidden_size, got "
                          f"{m.hidden_size}")


ROPE_SCALING_KEYS = ("type", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def _check_rope_scaling(m: ModelConfig) -> None:
    """model.rope_scaling: {} or Llama 3.x's five keys, each named when wrong."""
    scaling = m.rope_scaling
    if not scaling:
        return
    if m.position_embedding != "rope":
        raise ConfigError(f"model.rope_scaling needs model.position_embedding=rope, got "
                          f"{m.position_embedding!r}; drop model.rope_scaling")
    wrong = sorted(set(scaling) ^ set(ROPE_SCALING_KEYS))
    if wrong or scaling["type"] != "llama3":
        raise ConfigError(f"model.rope_scaling={scaling}: give exactly {{type: llama3, factor, "
                          f"low_freq_factor, high_freq_factor, original_max_position_embeddings}}"
                          f" (llama3 is the one scaling supported){'; wrong keys: ' if wrong else ''}"
                          f"{', '.join(map(str, wrong))}")
    for key in ROPE_SCALING_KEYS[1:]:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"model.rope_scaling.{key}={value!r} must be a positive number")
    if scaling["factor"] < 1:
        raise ConfigError(f"model.rope_scaling.factor={scaling['factor']} must be >= 1")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"model.rope_scaling.high_freq_factor={scaling['high_freq_factor']} "
                          f"must exceed low_freq_factor={scaling['low_freq_factor']}")


def _check_train(cfg: Config) -> None:
    t, p = cfg.train, cfg.parallel
    _at_least_one({"train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size,
                   "train.global_batch_size": t.global_batch_size,
                   "train.seq_length": t.seq_length, "train.log_interval": t.log_interval})
    _not_negative({"train.exit_at_step": t.exit_at_step})
    if t.exit_at_step > t.steps:
        raise ConfigError(f"train.exit_at_step={t.exit_at_step} is past train.steps={t.steps}; "
                          f"use 0 (run to the end) or a step <= {t.steps}")
    if t.seq_length > cfg.model.max_seq_length:
        raise ConfigError(f"train.seq_length={t.seq_length} exceeds model.max_seq_length="
                          f"{cfg.model.max_seq_length}; lower seq_length or raise max_seq_length")
    # The failure guards' limits; parallel.timeout_minutes (the collective watchdog) with them.
    if t.max_bad_steps < 1 or t.loss_spike_window < 2 or p.timeout_minutes < 1:
        raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} and parallel.timeout_minutes="
                          f"{p.timeout_minutes} must be >= 1, train.loss_spike_window="
                          f"{t.loss_spike_window} >= 2")
    for name, value in {"train.loss_spike_zscore": t.loss_spike_zscore,
                        "train.watchdog_factor": t.watchdog_factor,
                        "train.watchdog_min_s": t.watchdog_min_s}.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name}={value} must be a finite number >= 0 (0 turns it off)")
    if t.loss_spike_action != "warn" and not t.loss_spike_zscore:
        raise ConfigError(f"train.loss_spike_action={t.loss_spike_action} needs the spike "
                          f"detector: set train.loss_spike_zscore > 0 (e.g. 6)")
    if t.loss_spike_action == "rewind" and not cfg.checkpoint.interval:
        raise ConfigError("train.loss_spike_action=rewind needs checkpoints to rewind to: set "
                          "checkpoint.interval > 0")
    if not (math.isfinite(t.straggler_factor) and (t.straggler_factor == 0
                                                    or t.straggler_factor > 1)):
        raise ConfigError(f"train.straggler_factor={t.straggler_factor} must be 0 (off) or a "
                          f"finite number > 1, e.g. 1.5")
    if t.straggler_steps < 1:
        raise ConfigError(f"train.straggler_steps={t.straggler_steps} must be >= 1")
    if t.max_rewinds < 0:
        raise ConfigError(f"train.max_rewinds={t.max_rewinds} must be >= 0")
    if t.eval_interval < 0 or t.eval_batches < 1:
        raise ConfigError(f"train.eval_interval={t.eval_interval} must be >= 0 and "
                          f"train.eval_batches={t.eval_batches} >= 1")
    if t.micro_batch_size > t.global_batch_size:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} exceeds "
                          f"train.global_batch_size={t.global_batch_size}")


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # megatron-core's, for a dense model


def _check_recompute(p, backend: str) -> None:
    if p.recompute != "selective":
        return
    if "layernorm" in p.recompute_modules and backend != "te":
        # megatron-core's output-discarding checkpoint asks Transformer Engine's FP8 state
        raise ConfigError("parallel.recompute_modules=[layernorm] needs model.backend=te "
                          "(Transformer Engine); with the local layers use core_attn and mlp")
    unknown = [name for name in p.recompute_modules if name not in RECOMPUTE_MODULES]
    if unknown or not p.recompute_modules:
        raise ConfigError(f"parallel.recompute_modules={p.recompute_modules}: "
                          + (f"{', '.join(map(repr, unknown))} unknown; " if unknown else "empty; ")
                          + f"choose from {', '.join(RECOMPUTE_MODULES)} (the MoE and MLA modules "
                          f"of megatron-core have no counterpart in this model)")


def _check_parallel(cfg: Config, cuda: bool) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _check_recompute(p, m.backend)
    _at_least_one({"parallel.tensor_parallel": p.tensor_parallel,
                   "parallel.pipeline_parallel": p.pipeline_parallel,
                   "parallel.virtual_pipeline_chunks": p.virtual_pipeline_chunks})
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if m.num_attention_heads % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.num_attention_heads="
                          f"{m.num_attention_heads}; use one of {_divisors(m.num_attention_heads)}")
    if m.query_groups % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide the {m.query_groups} "
                          f"query groups (model.num_query_groups); use one of {_divisors(m.query_groups)}")
    if m.ffn_size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide the FFN size {m.ffn_size} "
                          f"(model.ffn_hidden_size); use one of {_divisors(m.ffn_size)}")
    stages = pp * p.virtual_pipeline_chunks
    if m.num_layers % stages:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x "
                          f"virtual_pipeline_chunks = {pp} x {p.virtual_pipeline_chunks} = {stages}; "
                          f"choose a layout whose product divides {m.num_layers}")
    if p.virtual_pipeline_chunks > 1 and pp == 1:
        raise ConfigError(f"parallel.virtual_pipeline_chunks={p.virtual_pipeline_chunks} needs "
                          f"parallel.pipeline_parallel > 1; set virtual_pipeline_chunks=1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.zero_stage >= 2 and pp > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pipeline_parallel={pp}: "
                          f"ZeRO-2/3 partition gradients during backward, which the pipeline "
                          f"schedule does not allow; use parallel.zero_stage=1 (or 0)")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1; "
                          "set sequence_parallel=false or raise tensor_parallel")
    if p.sequence_parallel and t.seq_length % tp:
        raise ConfigError(f"parallel.sequence_parallel splits the sequence over TP={tp}, but "
                          f"train.seq_length={t.seq_length} is not divisible by {tp}")
    if p.precision == "bf16" and not cuda:
        raise ConfigError("parallel.precision=bf16 needs a GPU; use precision=auto (fp32 on CPU)")


def _check_optim(o: OptimConfig, steps: int) -> None:
    _not_negative({"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.grad_clip": o.grad_clip,
                   "optim.weight_decay": o.weight_decay, "optim.z_loss": o.z_loss,
                   "optim.warmup_steps": o.warmup_steps})
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}; set min_lr <= lr")
    if o.warmup_steps > steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={steps}; "
                          f"use at most {steps}")
    _check_schedule(o, steps)


def _check_schedule(o: OptimConfig, steps: int) -> None:
    """The WSD keys: refused with another schedule, and the decay must fit after warmup."""
    if o.schedule != "wsd":
        changed = [name for name, value, default in (
            ("decay_steps", o.decay_steps, 0), ("decay_fraction", o.decay_fraction, 0.2),
            ("decay_shape", o.decay_shape, "1-sqrt")) if value != default]
        if changed:
            raise ConfigError(f"optim.{changed[0]} applies to optim.schedule=wsd only, but the "
                              f"schedule is {o.schedule}; set optim.schedule=wsd or drop it")
        return
    if o.decay_steps < 0:
        raise ConfigError(f"optim.decay_steps={o.decay_steps} must not be negative "
                          f"(0: optim.decay_fraction x train.steps)")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    length = o.wsd_decay_length(steps)
    if length > steps - o.warmup_steps:
        raise ConfigError(f"the WSD decay ({length} steps) is longer than the "
                          f"{steps - o.warmup_steps} steps after warmup (train.steps={steps}, "
                          f"optim.warmup_steps={o.warmup_steps}); shorten optim.decay_steps or "
                          f"raise train.steps")


def _check_document_mask(cfg: Config, cuda: bool) -> None:
    d = cfg.data
    if not d.reset_attention or d.document_mask == "dense" or (d.document_mask == "auto"
                                                                and not cuda):
        return
    if d.document_mask == "flex" and not cuda:
        raise ConfigError("data.document_mask=flex needs a CUDA device (flex attention's "
                          "backward is compiled for it); on CPU use data.document_mask=dense")
    if cfg.model.dropout:
        raise ConfigError(f"data.document_mask=flex has no attention dropout (model.dropout="
                          f"{cfg.model.dropout}); set model.dropout=0 or data.document_mask=dense")


def _check_data(d: DataConfig, steps: int) -> None:
    if not d.train:
        raise ConfigError("data.train is empty; give a shard directory from data_tools/shard.py "
                          "or 'embedded'")
    previous = 0
    for i, stage in enumerate(d.stages):
        if stage["at_step"] <= previous or stage["at_step"] >= steps:
            raise ConfigError(f"data.stages[{i}].at_step={stage['at_step']} must be after the "
                              f"previous stage (step {previous}) and before train.steps="
                              f"{steps}; list stages in increasing order of at_step")
        previous = stage["at_step"]
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must not be negative")


def _check_checkpoint(c: CheckpointConfig) -> None:
    _not_negative({"checkpoint.interval": c.interval, "checkpoint.keep_every": c.keep_every},
                  note=" (0 turns it off)")
    if c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last} must be at least 1: the newest "
                          f"checkpoint is what a restart resumes from")
    if not (math.isfinite(c.save_timeout_s) and c.save_timeout_s > 0):
        raise ConfigError(f"checkpoint.save_timeout_s={c.save_timeout_s} must be a positive "
                          f"number of seconds (the longest a save may take before the run "
                          f"gives it up and exits {EXIT_HUNG} to be requeued)")
    if c.weights_only and not c.load_from:
        raise ConfigError("checkpoint.weights_only=true needs checkpoint.load_from=PATH (the "
                          "checkpoint whose weights start this run)")


def _check_profile(cfg: Config, world_size: int | None) -> None:
    p, steps = cfg.logging.profile, cfg.train.steps
    if p.start_step == 0:
        return
    if p.start_step < 0 or p.steps < 1:
        raise ConfigError(f"logging.profile.start_step={p.start_step} and .steps={p.steps} must "
                          f"be >= 1 (start_step 0 turns the profiler off)")
    if p.start_step + p.steps - 1 > steps:
        raise ConfigError(f"logging.profile covers steps {p.start_step}-{p.start_step + p.steps - 1}"
                          f", past train.steps={steps}; start it earlier or profile fewer steps")
    if not p.ranks or min(p.ranks) < 0 or (world_size and max(p.ranks) >= world_size):
        raise ConfigError(f"logging.profile.ranks={p.ranks} must name ranks of this run (0 to "
                          f"{(world_size or 1) - 1})")


def _check_logging(lg: LoggingConfig) -> None:
    if not (math.isfinite(lg.peak_tflops) and lg.peak_tflops >= 0):
        raise ConfigError(f"logging.peak_tflops={lg.peak_tflops} must be a finite number >= 0 "
                          f"(0: from the GPU's name)")
    if not lg.wandb.project and (lg.wandb.entity or lg.wandb.name):
        raise ConfigError("logging.wandb.entity/name are set but logging.wandb.project is empty; "
                          "set logging.wandb.project=NAME to log to Weights & Biases")


def validate(cfg: Config, world_size: int | None = None, vocab_size: int | None = None,
             cuda: bool = False) -> Layout | None:
    """All cross-field checks. Returns the derived Layout when the world size is known.
    Sections go in dependency order: the model's sizes before the parallel layout that must
    divide them, train.steps before the schedule and data stages placed within it."""
    _check_model(cfg.model)
    _check_train(cfg)
    _check_parallel(cfg, cuda)
    _check_optim(cfg.optim, cfg.train.steps)
    _check_data(cfg.data, cfg.train.steps)
    _check_document_mask(cfg, cuda)
    _check_checkpoint(cfg.checkpoint)
    _check_logging(cfg.logging)
    _check_profile(cfg, world_size)
    if world_size is None:
        return None
    return derive_layout(cfg, world_size, vocab_size)


# Settings that define a run: resuming in a run directory with any of them changed would
# mix two different trainings in one directory (layout, steps, LR and checkpoint settings
# may change between restarts).
_RUN_IDENTITY = ("model", "data.train", "data.stages", "train.seed", "train.seq_length")


def check_run_dir(cfg: Config) -> None:
    """Refuse a run directory that is not a writable directory, or whose config file belongs
    to a different run. Nothing is created here (a dry run leaves no trace)."""
    existing = Path(cfg.run.dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir}: {existing} is a file, not a directory; choose "
                          f"another run.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={cfg.run.dir}: {existing} is not writable (read-only or no "
                          f"permission); choose a writable run.dir")
    path = RunDir(cfg.run.dir).config
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: unreadable ({err}); move it away or use a new run.dir") from None
    # Read back through the same coercion as any config, so a file written by an older
    # version (a key it did not have yet, `train: embedded` before blends were lists)
    # compares by meaning, not by spelling; keys this version no longer has are skipped.
    saved = Config()
    for section, values in (old if isinstance(old, dict) else {}).items():
        target = getattr(saved, section, None)
        if not dataclasses.is_dataclass(target) or not isinstance(values, dict):
            continue
        for key, value in values.items():
            try:
                apply_override(target, key, value, f"{section}.{key}")
            except ConfigError:
                continue
    old, new = saved.to_dict(), cfg.to_dict()
    diffs = []
    for name in _RUN_IDENTITY:
        section, _, key = name.partition(".")
        a, b = old.get(section, {}), new.get(section, {})
        if key:
            a, b = {key: a.get(key)}, {key: b.get(key)}
        for k in sorted(set(a) | set(b)):
            if k in ("backend", "compile") or a.get(k) == b.get(k):  # implementation choices
                continue
            diffs.append(f"{section}.{k}={a.get(k)!r} there, {b.get(k)!r} here")
    if diffs:
        more = f" (and {len(diffs) - 2} more)" if len(diffs) > 2 else ""
        raise ConfigError(f"run.dir={cfg.run.dir} belongs to another run: its {CONFIG} has "
                          f"{'; '.join(diffs[:2])}{more}. Resume with the same settings or "
                          f"choose a new run.dir")

