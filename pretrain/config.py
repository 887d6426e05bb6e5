"""The typed configuration tree: YAML files in configs/, dotted command-line overrides, and
every cross-field check in one place, each failing with one line that names the fix.

A run config may name its model by size (`model: 1b`), which loads `configs/model/1b.yaml`
next to it; keys given in the run config's model section or on the command line win.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


from pretrain.errors import ConfigError  # noqa: F401 - part of this module's interface


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class ModelConfig:
    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 0  # 0: one group per head (multi-head attention)
    ffn_hidden_size: int = 0  # 0: 4h for gelu, 8h/3 rounded up to a multiple of 64 for swiglu
    max_seq_length: int = 128  # positions the embedding (or RoPE cache) covers
    position_embedding: Literal["rope", "learned", "sinusoidal"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    activation: Literal["swiglu", "gelu"] = "swiglu"
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-5
    bias: bool = False
    dropout: float = 0.0
    vocab_size: int = 0  # 0: the tokenizer's; larger reserves rows (must be >= the tokenizer's)
    make_vocab_size_divisible_by: int = 128
    backend: Literal["auto", "te", "local"] = "auto"
    # Compiled RoPE/norm/SwiGLU/residual/cross-entropy regions (model/fused.py); auto: with
    # CUDA. Same model and checkpoints either way.
    compile: Literal["auto", "on", "off"] = "auto"

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_chunks: int = 1  # >1: interleaved 1F1B with this many chunks per stage
    sequence_parallel: bool = False
    zero_stage: int = 1
    recompute: Literal["none", "full"] = "none"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    timeout_minutes: int = 30  # a collective waiting longer than this fails the run
    # DeepSpeed config keys deep-merged over ours (parallel/zero.py): a mapping, or a path to
    # a JSON file; e.g. {zero_optimization: {offload_optimizer: {device: cpu}}}. Keys the
    # batch/precision/optimizer contract owns are refused (parallel/deepspeed_user.py).
    deepspeed: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 100  # length of the LR schedule
    exit_at_step: int = 0  # >0: stop cleanly after this step; the schedule is unchanged
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    log_interval: int = 1
    sample_tokens: int = 0  # >0: print a sampled continuation of this many tokens at the end
    eval_interval: int = 0  # >0: validation loss every this many steps (and at the end)
    eval_batches: int = 4  # global batches per validation (the same ones every time)
    # A step whose loss or gradient norm is not finite is skipped (no update); this many in
    # a row stop the run with exit 2, which the SLURM script does not requeue.
    max_bad_steps: int = 3
    loss_spike_zscore: float = 0.0  # >0: flag a loss this many std devs above the recent mean
    loss_spike_window: int = 100  # steps the spike detector averages over
    # Hang watchdog: a step longer than max(watchdog_min_s, watchdog_factor x the median
    # step) dumps every rank's Python stacks and exits 76 (requeued). 0 turns it off.
    watchdog_factor: float = 10.0
    watchdog_min_s: float = 600.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # where the decay ends
    warmup_steps: int = 10
    # After the linear warmup: cosine or linear decay to min_lr at train.steps, constant lr,
    # or wsd (warmup-stable-decay: MiniCPM 2024, Hägele et al. 2024): lr until the last
    # decay_steps (or decay_fraction x train.steps) steps, then decay_shape down to min_lr.
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    decay_steps: int = 0  # wsd only; 0: decay_fraction x train.steps
    decay_fraction: float = 0.2  # wsd only
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"  # wsd only

    def wsd_decay_length(self, total_steps: int) -> int:
        """Steps of the WSD decay at the end of the run: decay_steps, else the fraction."""
        return self.decay_steps or max(1, round(self.decay_fraction * total_steps))
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # PaLM's auxiliary z-loss weight (1e-4 there): z * log(Z)^2 per token, Z the softmax
    # normalizer; only the gradients see it, the logged loss is the cross entropy. 0: off.
    z_loss: float = 0.0


@dataclass
class DataConfig:
    # Training data: a shard directory written by data_tools/shard.py (or a URL prefix or a
    # `{name}` template for `pipe:` commands), a list of them, or a weighted blend
    # `[{path: A, weight: 0.7}, {path: B, weight: 0.3}]`. "embedded" is the built-in corpus.
    train: list = field(default_factory=lambda: [{"path": "embedded", "weight": 1.0}])
    # Validation data in the same forms; empty: the `val` split of the training sources.
    valid: list = field(default_factory=list)
    # Data stages: [{at_step: S, train: BLEND}, ...]; after step S the training blend is
    # BLEND (e.g. an anneal on a better mix), keeping optimizer, schedule and data position.
    stages: list[dict] = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece model for decoding samples; "": the manifest's
    num_workers: int = 2  # threads reading and verifying shards ahead of use
    verify_checksums: bool = True  # check each shard's size and sha256 against the manifest
    # Per-document attention (block-diagonal causal mask) and positions restarting at each
    # document, from the boundaries stored with every sample.
    reset_attention: bool = False
    # Debugging aid (nanoGPT/llm.c "overfit one batch"): every step trains on the first global
    # batch again; a correct setup drives its loss towards zero.
    repeat_first_batch: bool = False


@dataclass
class CheckpointConfig:
    # Save every this many steps (0: only when the run stops: at train.exit_at_step, at the
    # last step, or on SIGTERM/SIGUSR1). Saves go to RUN/checkpoints/step_{N:08d}/.
    interval: int = 0
    keep_last: int = 2  # retention: the newest k complete checkpoints ...
    keep_every: int = 0  # ... plus every one whose step is a multiple of this (0: none)
    # Start from another run's checkpoint (a step_N directory, a checkpoints/ directory or a
    # run directory: its newest complete one) when RUN/checkpoints holds none yet.
    load_from: str = ""
    weights_only: bool = False  # with load_from: weights only, fresh optimizer, step 0
    save_on_stop: bool = True  # save when the run stops (exit_at_step, last step, signal)
    # Write the files in a background process while training continues (GPU); "auto": on
    # when CUDA is available. On CPU a synchronous save is simple and fast enough.
    async_save: Literal["auto", "on", "off"] = "auto"
    verify: bool = True  # check every file's sha256 on load (spread over ranks)


@dataclass
class WandbConfig:
    # Weights & Biases: off unless a project is named. `offline` needs no account or network
    # (sync later with `wandb sync RUN/wandb/offline-run-*`); `online` needs `wandb login` or
    # WANDB_API_KEY. The run id is kept in RUN/wandb_run_id, so a resumed or requeued job
    # continues the same W&B run.
    project: str = ""
    entity: str = ""
    name: str = ""  # "": the run directory's name
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # event files under RUN/tensorboard/ (rank 0)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Peak dense bf16 TFLOP/s of one accelerator for MFU; 0: from the GPU's name (H100, H200,
    # A100, ...). On CPU, MFU is reported only when this is set.
    peak_tflops: float = 0.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overrides

def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's annotation; YAML-parse strings from the command line."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        # YAML 1.1 reads on/off (and yes/no) as booleans.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be an integer")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept anything float() parses.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(number):  # .nan / .inf: every comparison with them is False
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r} must be a string")
    if annotation is list:
        return _coerce_blend(value, where)
    if annotation is dict:
        return _coerce_mapping(value, where)
    if annotation == list[dict]:
        return _coerce_stages(value, where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(annotation))}")
        obj = annotation()
        for key, item in value.items():
            _apply(obj, str(key), item, f"{where}.{key}")
        return obj
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r} has the wrong type ({annotation})")
    raise TypeError(f"unsupported annotation {annotation} for {where}")


def _coerce_blend(value: Any, where: str) -> list[dict]:
    """A path, a list of paths, or a list of {path, weight} -> [{path, weight}, ...]."""
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item, "weight": 1.0}
        if not isinstance(item, dict) or set(item) - {"path", "weight"} or "path" not in item:
            raise ConfigError(f"{where}: {item!r} is not a path or a {{path: ..., weight: ...}} "
                              f"mapping, e.g. {where}=[{{path: data/web, weight: 0.7}}]")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}: weight {weight!r} of {item['path']!r} must be a "
                              f"positive finite number")
        out.append({"path": str(item["path"]), "weight": float(weight)})
    return out


def _coerce_mapping(value: Any, where: str) -> dict:
    """A free-form mapping (the DeepSpeed passthrough), or a path to a JSON file holding one."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise ConfigError(f"{where}={value}: key {dup!r} appears twice; keep one")
            return dict(pairs)

        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{where}={value!r} is neither a mapping nor an existing JSON "
                              f"file; give {{key: value, ...}} or the path of a DeepSpeed JSON")
        try:
            value = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{where}={path}: not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}={value!r} must be a mapping (or a JSON file path)")
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursing into mappings both have; neither input is modified."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = deep_merge(out[key], value)
        out[key] = value
    return out


def _coerce_stages(value: Any, where: str) -> list[dict]:
    """[{at_step: S, train: BLEND}, ...] with each blend in any form data.train accepts."""
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        value = [value]
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"at_step", "train"}:
            raise ConfigError(f"{where}[{i}]={item!r} must be a mapping of at_step and train, "
                              f"e.g. {where}=[{{at_step: 900, train: data/anneal}}]")
        step = item["at_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{where}[{i}].at_step={step!r} must be a step number >= 1")
        blend = _coerce_blend(item["train"], f"{where}[{i}].train")
        if not blend:
            raise ConfigError(f"{where}[{i}].train is empty; name the blend to switch to")
        out.append({"at_step": step, "train": blend})
    return out


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(section_obj: Any, key: str, value: Any, where: str) -> None:
    hints = _section_types(type(section_obj))
    head, dot, rest = key.partition(".")
    if dot and head in hints and dataclasses.is_dataclass(hints[head]):
        # A dotted key into a nested section (logging.wandb.mode=offline) sets one field.
        _apply(getattr(section_obj, head), rest, value, where)
        return
    if dot and hints.get(head) is dict:
        # A dotted key into a mapping (parallel.deepspeed.zero_optimization.overlap_comm=true)
        # sets one leaf, creating the levels above it.
        for part in reversed(rest.split(".")):
            value = {part: value}
        key = head
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown key {where!r}; known keys of this section: {known}")
    value = _coerce(value, hints[key], where)
    if hints[key] is dict:  # later sources merge into a mapping rather than replace it
        value = deep_merge(getattr(section_obj, key), value)
    setattr(section_obj, key, value)


def _merge_dict(cfg: Config, data: dict, source: str) -> None:
    sections = _section_types(Config)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; "
                              f"known sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            _apply(getattr(cfg, section), key, value, f"{section}.{key}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, "
                          f"e.g. configs/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); pass a YAML text file") from None
    if not data:  # an empty file would silently be a full default run
        raise ConfigError(f"{path} is empty; give at least run.dir and data.train, e.g. copy "
                          f"configs/smoke.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


# The configs shipped with the package: a link to configs/ in a checkout, copied into the wheel.
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def bundled_config_names() -> list[str]:
    """Names `--config` takes besides paths: configs/NAME.yaml (`pretrain_1b` also as `1b`)."""
    stems = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))
    return stems + [s.removeprefix("pretrain_") for s in stems if s.startswith("pretrain_")]


def resolve_config(name: str | Path) -> Path:
    """An existing file as given, else a bundled config by name (from any directory)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path  # a path: _read_yaml names it if it is missing
    for stem in (str(name), f"pretrain_{name}"):
        if (BUNDLED_CONFIGS / f"{stem}.yaml").is_file():
            return BUNDLED_CONFIGS / f"{stem}.yaml"
    raise ConfigError(f"config {str(name)!r} is neither a file nor a bundled config; bundled: "
                      f"{', '.join(bundled_config_names())}, or pass a YAML path")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a run config (a path or a bundled name), expand `model: NAME`, then apply
    `section.key=value` overrides."""
    path = resolve_config(path)
    data = _read_yaml(path)
    cfg = Config()
    model = data.get("model")
    if isinstance(model, str):
        data = dict(data)
        data.pop("model")
        _merge_dict(cfg, {"model": _model_preset(path.parent, model)}, f"model preset {model!r}")
    elif isinstance(model, dict) and "preset" in model:
        model = dict(model)
        preset = model.pop("preset")
        _merge_dict(cfg, {"model": _model_preset(path.parent, preset)}, f"model preset {preset!r}")
        data = dict(data, model=model)
    _merge_dict(cfg, data, str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              f"e.g. parallel.tensor_parallel=2")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section == "model" and key == "preset":
            _merge_dict(cfg, {"model": _model_preset(path.parent, raw)}, f"model preset {raw!r}")
            continue
        sections = _section_types(Config)
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; "
                              f"known sections: {', '.join(sorted(sections))}")
        _apply(getattr(cfg, section), key, _parse_override(raw), dotted)
    return cfg


def _parse_override(raw: str) -> Any:
    """A command-line value as YAML (numbers, booleans, lists, mappings), else the text."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def coerce_override(dotted: str, value: Any, where: str) -> Any:
    """The value `section.key=value` would set, checked as an override would be; errors name
    `where` (e.g. the command-line flag that stands for the key)."""
    if isinstance(value, str):
        value = _parse_override(value)
    section, _, key = dotted.partition(".")
    if section not in _section_types(Config):
        raise ConfigError(f"{where}: unknown section {section!r}")
    target = getattr(Config(), section)
    _apply(target, key, value, where)
    for part in key.split("."):
        target = target[part] if isinstance(target, dict) else getattr(target, part)
    return target


def _model_preset(config_dir: Path, name: str) -> dict:
    for candidate in (config_dir / "model" / f"{name}.yaml",
                      config_dir.parent / "model" / f"{name}.yaml",
                      BUNDLED_CONFIGS / "model" / f"{name}.yaml"):
        if candidate.is_file():
            data = _read_yaml(candidate)
            return dict(data.get("model", data), name=name)
    available = sorted(p.stem for p in (config_dir / "model").glob("*.yaml"))
    raise ConfigError(f"model preset {name!r} not found in {config_dir / 'model'}; "
                      f"available: {', '.join(available) or 'none'}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Settings that define a run: resuming in a run directory with any of them changed would
# mix two different trainings in one directory (layout, steps, LR and checkpoint settings
# may change between restarts).
_RUN_IDENTITY = ("model", "data.train", "data.stages", "train.seed", "train.seq_length")


def check_run_dir(cfg: Config) -> None:
    """Refuse a run directory that is not a writable directory, or whose config.yaml belongs
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
    path = Path(cfg.run.dir) / "config.yaml"
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
                _apply(target, key, value, f"{section}.{key}")
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
        raise ConfigError(f"run.dir={cfg.run.dir} belongs to another run: its config.yaml has "
                          f"{'; '.join(diffs[:2])}{more}. Resume with the same settings or "
                          f"choose a new run.dir")


# ---------------------------------------------------------------- derived values and checks

@dataclass(frozen=True)
class Layout:
    """Sizes derived from a config and a world size; the single source for every other module."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    num_micro_batches: int  # per optimizer step on each data-parallel rank
    padded_vocab_size: int


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def pad_vocab(vocab_size: int, cfg: Config) -> int:
    """Round up to a multiple of both make_vocab_size_divisible_by and TP. Unlike megatron's
    `divisible_by x TP`, this keeps the padded vocabulary (hence the model) the same across
    TP sizes that divide the multiple, which layout parity and resharding rely on."""
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)
    return multiple * math.ceil(vocab_size / multiple)


def _check_schedule(o: OptimConfig, steps: int) -> None:
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


def validate(cfg: Config, world_size: int | None = None, vocab_size: int | None = None,
             cuda: bool = False) -> Layout | None:
    """All cross-field checks. Returns the derived Layout when the world size is known."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.max_seq_length": m.max_seq_length,
        "parallel.tensor_parallel": p.tensor_parallel, "parallel.pipeline_parallel": p.pipeline_parallel,
        "parallel.virtual_pipeline_chunks": p.virtual_pipeline_chunks, "train.steps": t.steps,
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
        "train.seq_length": t.seq_length, "train.log_interval": t.log_interval,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    for name, value in {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "model.init_std": m.init_std,
                        "optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay,
                        "optim.z_loss": o.z_loss,
                        "train.exit_at_step": t.exit_at_step, "model.vocab_size": m.vocab_size, "optim.warmup_steps": o.warmup_steps,
                        "model.num_query_groups": m.num_query_groups,
                        "model.ffn_hidden_size": m.ffn_hidden_size}.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must not be negative")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}; set min_lr <= lr")
    if o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}; "
                          f"use at most {t.steps}")
    _check_schedule(o, t.steps)
    if t.exit_at_step > t.steps:
        raise ConfigError(f"train.exit_at_step={t.exit_at_step} is past train.steps={t.steps}; "
                          f"use 0 (run to the end) or a step <= {t.steps}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} does not divide "
                          f"model.hidden_size={m.hidden_size}; use one of {_divisors(m.hidden_size)}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} does not divide "
                          f"model.num_attention_heads={m.num_attention_heads}; "
                          f"use one of {_divisors(m.num_attention_heads)}")
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got hidden_size/heads="
                          f"{m.hidden_size // m.num_attention_heads}; change model.num_attention_heads")
    if m.position_embedding == "sinusoidal" and m.hidden_size % 2:
        raise ConfigError(f"sinusoidal positions need an even model.hidden_size, got "
                          f"{m.hidden_size}")
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
    if t.seq_length > m.max_seq_length:
        raise ConfigError(f"train.seq_length={t.seq_length} exceeds model.max_seq_length="
                          f"{m.max_seq_length}; lower seq_length or raise max_seq_length")
    if p.precision == "bf16" and not cuda:
        raise ConfigError("parallel.precision=bf16 needs a GPU; use precision=auto (fp32 on CPU)")
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give a shard directory from data_tools/shard.py "
                          "or 'embedded'")
    previous = 0
    for i, stage in enumerate(cfg.data.stages):
        if stage["at_step"] <= previous or stage["at_step"] >= t.steps:
            raise ConfigError(f"data.stages[{i}].at_step={stage['at_step']} must be after the "
                              f"previous stage (step {previous}) and before train.steps="
                              f"{t.steps}; list stages in increasing order of at_step")
        previous = stage["at_step"]
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must not be negative")
    if t.max_bad_steps < 1 or t.loss_spike_window < 2 or p.timeout_minutes < 1:
        raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} and parallel.timeout_minutes="
                          f"{p.timeout_minutes} must be >= 1, train.loss_spike_window="
                          f"{t.loss_spike_window} >= 2")
    for name, value in {"train.loss_spike_zscore": t.loss_spike_zscore,
                        "train.watchdog_factor": t.watchdog_factor,
                        "train.watchdog_min_s": t.watchdog_min_s}.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name}={value} must be a finite number >= 0 (0 turns it off)")
    if t.eval_interval < 0 or t.eval_batches < 1:
        raise ConfigError(f"train.eval_interval={t.eval_interval} must be >= 0 and "
                          f"train.eval_batches={t.eval_batches} >= 1")
    c = cfg.checkpoint
    for name, value in {"checkpoint.interval": c.interval, "checkpoint.keep_every": c.keep_every}.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must not be negative (0 turns it off)")
    if c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last} must be at least 1: the newest "
                          f"checkpoint is what a restart resumes from")
    if c.weights_only and not c.load_from:
        raise ConfigError("checkpoint.weights_only=true needs checkpoint.load_from=PATH (the "
                          "checkpoint whose weights start this run)")
    lg = cfg.logging
    if not (math.isfinite(lg.peak_tflops) and lg.peak_tflops >= 0):
        raise ConfigError(f"logging.peak_tflops={lg.peak_tflops} must be a finite number >= 0 "
                          f"(0: from the GPU's name)")
    if not lg.wandb.project and (lg.wandb.entity or lg.wandb.name):
        raise ConfigError("logging.wandb.entity/name are set but logging.wandb.project is empty; "
                          "set logging.wandb.project=NAME to log to Weights & Biases")
    if t.micro_batch_size > t.global_batch_size:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} exceeds "
                          f"train.global_batch_size={t.global_batch_size}")
    if world_size is None:
        return None
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor_parallel x "
                          f"pipeline_parallel = {tp} x {pp} = {tp * pp}; launch a multiple of "
                          f"{tp * pp} processes or change the layout")
    dp = world_size // (tp * pp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"micro_batch_size x data_parallel = {t.micro_batch_size} x {dp} = "
                          f"{per_step}; use {lower} or {lower + per_step}")
    micro_batches = t.global_batch_size // per_step
    if p.virtual_pipeline_chunks > 1 and micro_batches % pp:
        raise ConfigError(f"interleaved pipelining needs the {micro_batches} micro-batches per step "
                          f"(global_batch / (micro_batch x dp)) to be a multiple of "
                          f"pipeline_parallel={pp}; adjust train.global_batch_size")
    if vocab_size and m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size}; use 0 (take the tokenizer's) or at least {vocab_size}")
    padded = pad_vocab(max(vocab_size or 0, m.vocab_size), cfg) if (vocab_size or m.vocab_size) else 0
    return Layout(world_size=world_size, tensor_parallel=tp, pipeline_parallel=pp,
                  data_parallel=dp, micro_batch_size=t.micro_batch_size,
                  num_micro_batches=micro_batches, padded_vocab_size=padded)
