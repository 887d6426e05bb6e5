"""Megatron-LM's (and DeepSpeed's launcher's) command-line spellings, turned into our dotted
overrides where the meaning is the same; the table of what maps and why is docs/megatron-flags.md.

`--num-layers 24` becomes `model.num_layers=24`. A flag whose Megatron meaning differs from
ours is refused with the reason, never approximated; giving a flag and its own key with
different values is refused too.
"""

from __future__ import annotations

from pretrain.config.load import coerce_override
from pretrain.errors import ConfigError

# flag -> (our key, how its value maps): None passes the value through; a dict translates
# Megatron's spelling of a choice into ours (choices it lacks are refused); a one-item tuple
# marks a switch without a value that sets our key to that item.
ALIASES: dict[str, tuple[str, object]] = {
    "--tensor-model-parallel-size": ("parallel.tensor_parallel", None),
    "--pipeline-model-parallel-size": ("parallel.pipeline_parallel", None),
    "--virtual-pipeline-model-parallel-size": ("parallel.virtual_pipeline_chunks", None),
    "--sequence-parallel": ("parallel.sequence_parallel", (True,)),
    "--use-distributed-optimizer": ("parallel.zero_stage", (1,)),
    "--recompute-granularity": ("parallel.recompute", {"full": "full", "selective": "selective"}),
    "--recompute-modules": ("parallel.recompute_modules", list),
    "--bf16": ("parallel.precision", ("bf16",)),
    "--distributed-timeout-minutes": ("parallel.timeout_minutes", None),
    "--num-layers": ("model.num_layers", None),
    "--hidden-size": ("model.hidden_size", None),
    "--ffn-hidden-size": ("model.ffn_hidden_size", None),
    "--num-attention-heads": ("model.num_attention_heads", None),
    "--num-query-groups": ("model.num_query_groups", None),
    "--kv-channels": ("model.head_dim", None),
    "--qk-layernorm": ("model.qk_norm", (True,)),
    "--add-qkv-bias": ("model.qkv_bias", (True,)),
    "--max-position-embeddings": ("model.max_seq_length", None),
    "--position-embedding-type": ("model.position_embedding",
                                  {"rope": "rope", "learned_absolute": "learned"}),
    "--rotary-base": ("model.rotary_base", None),
    "--normalization": ("model.normalization", {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}),
    "--norm-epsilon": ("model.norm_eps", None),
    "--swiglu": ("model.activation", ("swiglu",)),
    "--untie-embeddings-and-output-weights": ("model.tie_embeddings", (False,)),
    "--disable-bias-linear": ("model.bias", (False,)),
    "--init-method-std": ("model.init_std", None),
    "--seq-length": ("train.seq_length", None),
    "--micro-batch-size": ("train.micro_batch_size", None),
    "--global-batch-size": ("train.global_batch_size", None),
    "--train-iters": ("train.steps", None),
    "--seed": ("train.seed", None),
    "--log-interval": ("train.log_interval", None),
    "--eval-interval": ("train.eval_interval", None),
    "--eval-iters": ("train.eval_batches", None),
    "--lr": ("optim.lr", None),
    "--min-lr": ("optim.min_lr", None),
    "--lr-warmup-iters": ("optim.warmup_steps", None),
    "--lr-decay-style": ("optim.schedule", {"cosine": "cosine", "linear": "linear",
                                            "constant": "constant", "WSD": "wsd"}),
    "--lr-wsd-decay-iters": ("optim.decay_steps", None),
    "--lr-wsd-decay-style": ("optim.decay_shape", {"linear": "linear", "cosine": "cosine",
                                                   "minus_sqrt": "1-sqrt"}),
    "--weight-decay": ("optim.weight_decay", None),
    "--adam-beta1": ("optim.beta1", None),
    "--adam-beta2": ("optim.beta2", None),
    "--adam-eps": ("optim.eps", None),
    "--clip-grad": ("optim.grad_clip", None),
    "--save-interval": ("checkpoint.interval", None),
    "--save": ("run.dir", None),
    "--load": ("checkpoint.load_from", None),
    "--finetune": ("checkpoint.weights_only", (True,)),
    "--wandb-project": ("logging.wandb.project", None),
    "--wandb-exp-name": ("logging.wandb.name", None),
    # Megatron-DeepSpeed and deepspeed.add_config_arguments() spellings.
    "--zero-stage": ("parallel.zero_stage", None),
    "--deepspeed_config": ("parallel.deepspeed", None),
    "--deepspeed-config": ("parallel.deepspeed", None),
}

# Switches that only enable in Megatron what our keys already express: accepted, no effect.
NO_OPS = {
    "--group-query-attention": "model.num_query_groups > 0 alone enables grouped-query attention",
    "--deepspeed": "DeepSpeed is always on",
    "--use-mcore-models": "the model is always megatron-core's GPTModel",
}

# Megatron flags we know and do not map, with the reason (the error names it).
NOT_MAPPED = {
    "--fp16": "fp16 with loss scaling is not supported; use --bf16",
    "--data-path": "data is webdataset shards from data_tools/shard.py, not indexed .bin/.idx; "
                   "set data.train=DIR (or a blend)",
    "--split": "validation is the shards' val split; set data.valid or shard.py --val-fraction",
    "--tokenizer-type": "the tokenizer comes with the shards' manifest",
    "--tokenizer-model": "the tokenizer comes with the shards' manifest (data.tokenizer only "
                         "decodes samples)",
    "--vocab-size": "the vocabulary comes from the tokenizer; model.vocab_size only reserves rows",
    "--make-vocab-size-divisible-by": "our padding is lcm(multiple, TP), Megatron's multiple x TP; "
                                      "set model.make_vocab_size_divisible_by knowingly",
    "--lr-decay-iters": "the decay always ends at train.steps; set --train-iters",
    "--lr-warmup-fraction": "warmup is a step count; use --lr-warmup-iters",
    "--train-samples": "the run length is in steps; use --train-iters",
    "--exit-interval": "train.exit_at_step stops at one step, not every multiple",
    "--hidden-dropout": "one model.dropout covers hidden and attention dropout",
    "--attention-dropout": "one model.dropout covers hidden and attention dropout",
    "--recompute-method": "full recompute is always uniform over 1 layer; use "
                          "--recompute-granularity full",
    "--recompute-num-layers": "full recompute is always uniform over 1 layer; use "
                              "--recompute-granularity full",
    "--tensorboard-dir": "TensorBoard writes under run.dir/tensorboard; set "
                         "logging.tensorboard=true",
    "--ckpt-format": "checkpoints are always megatron-core dist-checkpointing (torch_dist)",
    "--no-load-optim": "a resume always restores the optimizer; use --finetune for weights only",
}


def _flag_value(argv: list[str], i: int, flag: str, takes_value: bool) -> tuple[str | None, int]:
    """The value of argv[i] (`--flag value` or `--flag=value`) and the next index."""
    head, eq, inline = argv[i].partition("=")
    if not takes_value:
        if eq:
            raise ConfigError(f"{flag} is a switch and takes no value, got {argv[i]!r}")
        return None, i + 1
    if eq:
        return inline, i + 1
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ConfigError(f"{flag} needs a value, e.g. {flag} 2")
    return argv[i + 1], i + 2


def translate(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split `argv` into the arguments left for our parser and (flag, `key=value`) overrides
    made from Megatron flags (each value checked; a bad one names the flag)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        flag = argv[i].partition("=")[0]
        if flag in NOT_MAPPED:
            raise ConfigError(f"{flag} (Megatron-LM) has no equivalent here: {NOT_MAPPED[flag]} "
                              f"(docs/megatron-flags.md)")
        if flag in NO_OPS:
            _, i = _flag_value(argv, i, flag, takes_value=False)
            continue
        if flag not in ALIASES:
            rest.append(argv[i])
            i += 1
            continue
        key, how = ALIASES[flag]
        if how is list:  # nargs: the words up to the next flag or `section.key=value`
            head, eq, inline = argv[i].partition("=")
            items, i = ([inline] if eq else []), i + 1
            while not eq and i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                items.append(argv[i])
                i += 1
            if not items:
                raise ConfigError(f"{flag} needs one or more values, e.g. {flag} core_attn mlp")
            coerce_override(key, ",".join(items), where=f"{flag} ({key})")
            overrides.append((flag, f"{key}={','.join(items)}"))
            continue
        raw, i = _flag_value(argv, i, flag, takes_value=not isinstance(how, tuple))
        if isinstance(how, tuple):
            value = how[0]
        elif isinstance(how, dict):
            if raw not in how:
                raise ConfigError(f"{flag} {raw}: not one of {', '.join(how)} (the Megatron "
                                  f"choices that have an equivalent here, {key})")
            value = how[raw]
        else:
            value = raw
        coerce_override(key, value, where=f"{flag} ({key})")
        overrides.append((flag, f"{key}={_as_text(value)}"))
    # Megatron resumes with `--save DIR --load DIR`; here a run resumes from its own run.dir.
    save = next((o for f, o in overrides if f == "--save"), None)
    load = next((o for f, o in overrides if f == "--load"), None)
    if save and load and save.partition("=")[2] == load.partition("=")[2]:
        overrides = [(f, o) for f, o in overrides if f != "--load"]
    return rest, overrides


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_agreement(from_flags: list[tuple[str, str]], overrides: list[str]) -> None:
    """A Megatron flag and its own key (or two flags for one key) given on the command line
    must agree."""
    keys = {item.partition("=")[0] for _, item in from_flags}
    spelled = [(f"{flag} (= {item})", item) for flag, item in from_flags]
    spelled += [(item, item) for item in overrides if item.partition("=")[0] in keys]
    given: dict[str, tuple[str, object]] = {}  # key -> (how it was spelt, value)
    for spelling, item in spelled:
        key, _, raw = item.partition("=")
        value = coerce_override(key, raw, key)
        if key in given and given[key][1] != value:
            raise ConfigError(f"{key} is given twice with different values: {given[key][0]} "
                              f"and {spelling}; give one")
        given.setdefault(key, (spelling, value))
