"""Loader throughput per data-parallel rank against what the 1b model consumes per GPU.

Requirement: tokens/s delivered to one rank >= 20x the tokens/s one H100 consumes training
the 1b config at 45% MFU. FLOPs per token follow the PaLM convention: 6 N + 12 L h s.

    python benchmarks/bench_loader.py --data DIR [--dp 4] [--steps 40] [--workers 2]

DIR is any shard directory written by data_tools/shard.py (its seq_len is used).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config  # noqa: E402
from pretrain.data.loader import BlendedLoader  # noqa: E402
from pretrain.data.sources import ShardSource  # noqa: E402
from pretrain.model.estimate import parameter_counts  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM
MFU = 0.45


def required_tokens_per_second(config: str) -> tuple[float, float, int]:
    cfg = load_config(config)
    m, s = cfg.model, cfg.train.seq_length
    params = parameter_counts(cfg, m.vocab_size)["total"]
    flops_per_token = 6 * params + 12 * m.num_layers * m.hidden_size * s
    return MFU * H100_BF16_PEAK / flops_per_token, flops_per_token, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/pretrain_1b.yaml")
    parser.add_argument("--dp", type=int, default=4, help="data-parallel size (rank 0 measured)")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reset-attention", action="store_true")
    args = parser.parse_args(argv)

    need, flops_per_token, params = required_tokens_per_second(args.config)
    source = ShardSource(args.data)
    seq = source.seq_len
    loader = BlendedLoader([source], [1.0], seq, args.global_batch, args.micro_batch, 0, args.dp,
                           seed=1, num_workers=args.workers, reset_attention=args.reset_attention)
    per_step = args.global_batch // args.dp * seq
    loader.next_step()  # warm-up: first shards, thread pool
    started = time.perf_counter()
    for _ in range(args.steps):
        loader.next_step()
    elapsed = time.perf_counter() - started
    loader.close()
    rate = args.steps * per_step / elapsed
    print(f"1b config: {params:,} parameters, {flops_per_token / 1e9:.2f} GFLOP/token; at "
          f"{MFU:.0%} MFU on an H100 one GPU consumes {need:,.0f} tokens/s; 20x = {20 * need:,.0f}")
    print(f"loader (rank 0 of DP {args.dp}, seq {seq}, global batch {args.global_batch}, "
          f"{args.workers} workers, {len(source.shard_samples)} shards, "
          f"{source.num_samples:,} samples): {rate:,.0f} tokens/s over {args.steps} steps "
          f"= {rate / need:.0f}x the requirement")
    return 0 if rate >= 20 * need else 1


if __name__ == "__main__":
    sys.exit(main())
