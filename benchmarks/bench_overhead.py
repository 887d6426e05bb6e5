"""Per-step cost of the framework against a plain PyTorch training loop of the same model, on
CPU, one process (issue #22 item 5: target <= 1.2x at 4 layers x 128 hidden, seq 64, micro-
batch 12).

    OMP_NUM_THREADS=2 python benchmarks/bench_overhead.py [--shape 4x128 6x256 12x768]

Ours: pretrain.train's own build (megatron-core GPTModel from our spec, the pipeline schedule
with PP=1, DeepSpeed ZeRO-1, our AdamW and LR schedule, the loader over the embedded corpus),
timed around Trainer.train_step(). Plain: the loop below, written for this benchmark: the same
maths (token embedding tied to the output, pre-norm RMSNorm blocks, RoPE, causal SDPA,
SwiGLU MLP, fp32, global-norm clipping at 1.0, AdamW with the same betas, eps, weight decay
on matrices only, foreach=False), on random tokens. Both run in this process, alternated over
`--rounds` rounds of `--steps` steps after `--warmup`; the medians of ms/step and their ratio
are printed per shape.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB, PADDED = 257, 384


def ffn_size(hidden: int) -> int:  # our default for SwiGLU (config/schema.py ffn_size)
    return -(-(8 * hidden // 3) // 64) * 64


class Block(torch.nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.RMSNorm(hidden, eps=1e-5)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.norm2 = torch.nn.RMSNorm(hidden, eps=1e-5)
        self.up = torch.nn.Linear(hidden, 2 * ffn_size(hidden), bias=False)
        self.down = torch.nn.Linear(ffn_size(hidden), hidden, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        q, k = (rope(t, cos, sin).transpose(1, 2) for t in (q, k))
        attn = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PlainGPT(torch.nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, seq: int):
        super().__init__()
        self.embed = torch.nn.Embedding(PADDED, hidden)
        self.blocks = torch.nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(hidden, eps=1e-5)
        half = hidden // heads // 2
        freqs = 1.0 / 10000 ** (torch.arange(half) / half)
        angles = torch.outer(torch.arange(seq).float(), freqs)[:, None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.view(-1, PADDED), labels.reshape(-1))


def plain_steps(layers, hidden, heads, seq, micro):
    torch.manual_seed(0)
    model = PlainGPT(layers, hidden, heads, seq)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    batch = torch.randint(0, VOCAB, (micro, seq + 1))

    def step():
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # one read per step, as our loop logs every step

    return step


def our_steps(layers, hidden, heads, seq, micro, run_dir: Path):
    from pretrain.config import load_config, validate
    from pretrain.data.build import open_data
    from pretrain.parallel import dist as pdist
    from pretrain.train import build

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.num_attention_heads={heads}", "model.ffn_hidden_size=0",
        f"model.max_seq_length={seq}", f"train.seq_length={seq}",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
        "train.steps=100000", "train.log_interval=100000", "train.sample_tokens=0",
        "checkpoint.save_on_stop=false", "data.train=embedded", "data.valid=[]",
        "model.compile=off", f"run.dir={run_dir}"])
    data = open_data(cfg)
    layout = validate(cfg, world_size=1, vocab_size=data.vocab_size)
    built = build(cfg, layout, data, pdist.ProcessEnv(0, 1, 0, "single"), bf16=False)
    return lambda: built.trainer.train_step()["loss"]


def median_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["4x128"], help="LAYERSxHIDDEN")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/bench_overhead"))
    args = parser.parse_args(argv)
    if len(args.shape) > 1:  # one process per shape: a process builds one trainer (one group)
        import subprocess

        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--shape")
        j = i + 1
        while j < len(rest) and not rest[j].startswith("--"):
            j += 1
        codes = [subprocess.call([sys.executable, __file__, *rest[:i], "--shape", shape,
                                  *rest[j:]]) for shape in args.shape]
        return max(codes)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, seq {args.seq}, micro-batch {args.micro}")
    for shape in args.shape:
        layers, hidden = (int(x) for x in shape.split("x"))
        heads = max(1, hidden // 32)
        ours = our_steps(layers, hidden, heads, args.seq, args.micro, args.run_dir / shape)
        plain = plain_steps(layers, hidden, heads, args.seq, args.micro)
        for step in (ours, plain):
            for _ in range(args.warmup):
                step()
        rounds = {"ours": [], "plain": []}
        for _ in range(args.rounds):  # alternated, so a noisy phase hits both
            rounds["ours"].append(median_ms(ours, args.steps))
            rounds["plain"].append(median_ms(plain, args.steps))
        o, p = statistics.median(rounds["ours"]), statistics.median(rounds["plain"])
        print(f"{shape}: ours {o:.2f} ms/step, plain {p:.2f} ms/step, ratio {o / p:.2f}x "
              f"(rounds: ours {', '.join(f'{x:.2f}' for x in rounds['ours'])}; plain "
              f"{', '.join(f'{x:.2f}' for x in rounds['plain'])})")
        if not math.isfinite(o / p):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
