"""Sizes derived from a validated config and a world size: the data-parallel degree, the
micro-batches per step and the padded vocabulary, with the checks only they allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config.schema import Config
from pretrain.errors import ConfigError


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


def pad_vocab(vocab_size: int, cfg: Config) -> int:
    """Round up to a multiple of both make_vocab_size_divisible_by and TP. Unlike megatron's
    `divisible_by x TP`, this keeps the padded vocabulary (hence the model) the same across
    TP sizes that divide the multiple, which layout parity and resharding rely on."""
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)
    return multiple * math.ceil(vocab_size / multiple)


def derive_layout(cfg: Config, world_size: int, vocab_size: int | None) -> Layout:
    """The sizes for `world_size` ranks, checking what only the world size and the
    tokenizer's vocabulary decide (validate() checks the rest first)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
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
