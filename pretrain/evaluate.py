"""`python -m pretrain.evaluate RUN_OR_CHECKPOINT --data SHARDS [section.key=value ...]`: loss
and perplexity of a checkpoint on a shard split, under any TP/PP/DP layout (torchrun).

No DeepSpeed engine, optimizer or training loader: the weights come from the standalone
reader (checkpoint/weights.py), each rank keeps its slice, and the split is scored in order,
whole global batches, through the same pipeline schedule as training. Prints one JSON line
(rank 0); exit status 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys

import torch
import yaml

from pretrain.log import is_rank0, log, quiet_library_warnings

quiet_library_warnings()

from pretrain.config import ConfigError, apply_override, validate  # noqa: E402
from pretrain.data.sources import open_source  # noqa: E402
from pretrain.errors import DataError, UserError, report  # noqa: E402
from pretrain.files import unwritable, write_atomic  # noqa: E402
from pretrain.parallel import cpu, dist as pdist  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ directory or one "
                        "step_N checkpoint")
    parser.add_argument("--data", required=True, help="shard directory (data_tools/shard.py), URL "
                        "prefix or 'embedded'")
    parser.add_argument("--split", default="val", help="split of the manifest to score")
    parser.add_argument("--max-batches", type=int, default=0,
                        help="score at most this many global batches (0: the whole split)")
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")
    parser.add_argument("overrides", nargs="*", help="parallel.* layout and train.micro_batch_size"
                        " / train.global_batch_size / train.seq_length overrides")
    return parser.parse_intermixed_args(argv)


def summarize(loss_sum: float, num_tokens: float, source) -> dict:
    """The reported numbers from the split's token-summed loss (nats)."""
    loss = loss_sum / max(num_tokens, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(num_tokens)}
    bytes_per_token = getattr(source, "bytes_per_token", None)  # when the manifest records it
    if bytes_per_token:
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return result


def setup(args, world_size: int):
    """Everything checkable before a process group exists: weights, config, layout, data."""
    from pretrain.checkpoint.weights import read_weights

    problem = args.output and unwritable(args.output)
    if problem:  # found before the evaluation, not after it
        raise ConfigError(f"--output {args.output}: {problem}")
    weights = read_weights(args.checkpoint)
    cfg = weights.run_config()
    cfg.parallel.zero_stage = 0
    for item in args.overrides:
        dotted, _, raw = item.partition("=")
        section, _, key = dotted.partition(".")
        if section not in ("parallel", "train") or not key or not raw:
            raise ConfigError(f"override {item!r}: evaluate takes parallel.* and train.* "
                              f"settings as section.key=value")
        apply_override(getattr(cfg, section), key, yaml.safe_load(raw), dotted)
    cfg.train.exit_at_step = 0
    source = open_source(args.data, args.split, cfg.train.seq_length)
    if source.tokenizer_sha256 != weights.train_state["tokenizer"]["sha256"]:
        raise DataError(f"{source.name} was tokenized with {source.tokenizer_sha256[:12]}, but "
                        f"{weights.path} was trained on {weights.train_state['tokenizer']['sha256'][:12]}"
                        f"; evaluate on data made with the checkpoint's tokenizer")
    if source.seq_len < cfg.train.seq_length:
        raise DataError(f"{source.name} holds samples of {source.seq_len} tokens, fewer than "
                        f"train.seq_length={cfg.train.seq_length}; pass train.seq_length="
                        f"{source.seq_len}")
    layout = validate(cfg, world_size=world_size, vocab_size=weights.vocab_size)
    batches = source.num_samples // cfg.train.global_batch_size
    if args.max_batches:
        batches = min(batches, args.max_batches)
    if batches < 1:
        raise DataError(f"{source.name}: {source.num_samples} samples, fewer than one global batch "
                        f"of {cfg.train.global_batch_size}; pass a smaller train.global_batch_size")
    return weights, cfg, layout, source, batches


@torch.no_grad()
def score(weights, cfg, layout, source, batches: int, device) -> dict:
    from megatron.core import parallel_state as ps

    from pretrain.checkpoint.weights import install
    from pretrain.data.loader import BlendedLoader
    from pretrain.model.gpt import build_model_chunks
    from pretrain.parallel.schedule import (ChunkProxy, ModelChunks, flex_masks, forward_backward,
                                            global_mean_loss)

    # fp32 whatever the run trained in: evaluation is cheap next to training, and exact.
    chunks = build_model_chunks(cfg, layout.padded_vocab_size, torch.float32, device)
    install(chunks, weights.state, ps.get_tensor_model_parallel_rank(), layout.tensor_parallel,
            cfg.model.activation == "swiglu", str(weights.path))
    for chunk in chunks:
        chunk.eval()
    model = ModelChunks(chunks)
    proxies = [ChunkProxy(model, i, chunk) for i, chunk in enumerate(chunks)]
    loader = BlendedLoader([source], [1.0], seq_length=cfg.train.seq_length,
                           global_batch_size=cfg.train.global_batch_size,
                           micro_batch_size=layout.micro_batch_size,
                           dp_rank=ps.get_data_parallel_rank(), dp_size=layout.data_parallel,
                           seed=cfg.train.seed, shuffle=False, num_workers=0,
                           reset_attention=cfg.data.reset_attention)
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_tokens = torch.zeros((), dtype=torch.float64)
    try:
        for _ in range(batches):
            part_sum, part_tokens = forward_backward(proxies, loader.next_step(),
                                                     cfg.train.seq_length,
                                                     layout.micro_batch_size, forward_only=True,
                                                     flex=flex_masks(cfg.data, device))
            loss_sum += part_sum
            num_tokens += part_tokens
    finally:
        loader.close()
    # global_mean_loss sums over DP and shares along the pipeline: the mean, and (dividing the
    # tokens by 1 per DP rank) the mean token count per DP rank.
    mean = global_mean_loss(loss_sum, num_tokens, device)
    total_tokens = global_mean_loss(num_tokens, torch.ones((), dtype=torch.float64), device) \
        * layout.data_parallel
    result = summarize(mean * total_tokens, total_tokens, source)
    result.update({"checkpoint": str(weights.path), "step": weights.train_state["step"],
                   "data": source.name, "samples": batches * cfg.train.global_batch_size,
                   "layout": {"tensor_parallel": layout.tensor_parallel,
                              "pipeline_parallel": layout.pipeline_parallel,
                              "data_parallel": layout.data_parallel}})
    return result


def main(argv=None) -> int:
    gc.freeze()  # the imports' objects are never garbage (why: pretrain/train.py's main)
    args = parse_args(argv)
    env = pdist.detect_env()
    try:
        weights, cfg, layout, source, batches = setup(args, env.world_size)
    except UserError as err:
        return report(err, rank=env.rank)
    cpu.enable()
    pdist.init_process_group(env)
    p = cfg.parallel
    pdist.init_model_parallel(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_chunks,
                              cfg.train.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    log(f"evaluate: {weights.path} on {source.name}: {batches} global batches of "
        f"{cfg.train.global_batch_size} x {cfg.train.seq_length} tokens")
    try:
        result = score(weights, cfg, layout, source, batches, device)
    except UserError as err:
        return report(err, rank=env.rank)
    if is_rank0():
        line = json.dumps(result)
        print(line)
        if args.output:
            write_atomic(args.output, line + "\n")
    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
