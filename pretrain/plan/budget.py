"""Turn a compute budget into a run: compute-optimal size and tokens from a law, a model
shape of that size, the cheapest layout that fits the GPU's memory, time and loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import Config, ConfigError, validate
from pretrain.model.estimate import flops_per_token, memory_per_rank, peak_tflops
from pretrain.plan.law import ScalingLaw
from pretrain.plan.runs import PlanError, matmul_parameters

# The default MFU: the 1b model (configs/pretrain_1b.yaml, TP1 PP1 DP1, ZeRO-1, bf16) on one
# H200 measured 43.7% (/work/shared/notes/gpu-facts.md, 2026-11-30, commit 141a74f). Multi-
# node runs lose some of it to communication: pass --mfu with a number of your own.
MEASURED_MFU = 0.437
# Memory per accelerator (GiB), matched in order like estimate.PEAK_BF16_TFLOPS.
GPU_MEMORY_GIB = (("GH200", 96), ("H200", 141), ("H100 NVL", 94), ("H100", 80), ("H800", 80),
                  ("B200", 180), ("B100", 180), ("A100-40", 40), ("A100", 80), ("A800", 80),
                  ("L40S", 48), ("L40", 48), ("L4", 24), ("A10G", 24), ("A10", 24),
                  ("MI300X", 192), ("MI250X", 128))
MEMORY_HEADROOM = 0.85  # of the GPU: CUDA context, allocator fragmentation, NCCL buffers
GPUS_PER_NODE = 8
ASPECT = 96  # hidden size per layer near the optimum Kaplan et al. (2020, fig. 5) report
SMALLEST = (2, 128)  # layers, hidden: below this a "model" is not worth planning


def gpu_memory_gib(name: str) -> float | None:
    key = name.upper()
    for pattern, gib in GPU_MEMORY_GIB:
        if pattern in key:
            return float(gib)
    return None


def shape_config(layers: int, hidden: int, vocab: int, seq_length: int) -> Config:
    """A llama-style shape: head dim 128 (64 below 1024 wide), GQA (8 KV groups from 32
    heads up as Llama 2 70B, else 4 heads per group from 8 heads), SwiGLU, RMSNorm, RoPE,
    embeddings tied below 1024 wide."""
    cfg = Config()
    m = cfg.model
    head_dim = 128 if hidden >= 1024 else 64
    heads = hidden // head_dim
    m.num_layers, m.hidden_size, m.num_attention_heads = layers, hidden, heads
    if heads >= 32 and heads % 8 == 0:
        m.num_query_groups = 8
    elif heads >= 8 and heads % 4 == 0:
        m.num_query_groups = heads // 4
    m.max_seq_length, m.vocab_size = seq_length, vocab
    m.tie_embeddings = hidden < 1024
    m.name = f"plan-{layers}x{hidden}"
    cfg.train.seq_length = seq_length
    return cfg


def model_shape(params: float, vocab: int, seq_length: int) -> Config:
    """The shape whose matrix-multiply parameter count is nearest `params`, preferring a
    width/depth ratio near ASPECT."""
    small = matmul_parameters(shape_config(*SMALLEST, vocab, seq_length), vocab)
    if params < small:
        raise PlanError(f"the budget gives a compute-optimal model of {params:.3g} parameters, "
                        f"below the smallest shape ({SMALLEST[0]} layers x {SMALLEST[1]} wide, "
                        f"{small:.3g}); raise the budget (--flops, --gpus, --days)")
    best = None
    # Even depths (multiples of 4 from 32: more pipeline splits); widths on coarser steps
    # as they grow, so head and KV-group counts divide by the TP sizes one would use.
    depths = [d for d in range(2, 161, 2) if d < 32 or d % 4 == 0]
    widths = [w for w in range(128, 32769, 128)
              if w % (128 if w < 1024 else 256 if w < 4096 else 512 if w < 8192 else 1024) == 0]
    for layers in depths:
        for hidden in widths:
            if not 24 <= hidden / layers <= 400:
                continue
            cfg = shape_config(layers, hidden, vocab, seq_length)
            n = matmul_parameters(cfg, vocab)
            score = abs(math.log(n / params)) + 0.1 * abs(math.log(hidden / layers / ASPECT))
            if best is None or score < best[0]:
                best = (score, cfg)
    return best[1]


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def choose_layout(cfg: Config, gpus: int, vocab: int, memory_gib: float,
                  batch_sequences: int) -> Config:
    """Fill cfg.parallel and the batch sizes with the cheapest layout that fits: no
    recompute (a third more compute), then the least model parallelism, ZeRO-1 before 2,
    the largest micro-batch. TP stays within a node (NVLink), PP divides the layers.
    Memory is estimate.memory_per_rank (checked against measured bytes)."""
    m = cfg.model
    budget = memory_gib * 2 ** 30 * MEMORY_HEADROOM
    options = []
    for tp in _divisors(GPUS_PER_NODE, GPUS_PER_NODE):
        for pp in _divisors(m.num_layers, 64):
            if gpus % (tp * pp) or m.num_attention_heads % tp or m.query_groups % tp \
                    or m.ffn_size % tp:
                continue
            for recompute in ("none", "full"):
                for zero in (1, 2) if pp == 1 else (1,):
                    for micro in (8, 4, 2, 1):
                        options.append((recompute != "none", tp * pp, zero, -micro, tp, pp))
    for recomputes, _, zero, micro, tp, pp in sorted(options):
        dp = gpus // (tp * pp)
        p, t = cfg.parallel, cfg.train
        p.tensor_parallel, p.pipeline_parallel, p.zero_stage = tp, pp, zero
        p.recompute, p.precision = ("full" if recomputes else "none"), "bf16"
        p.sequence_parallel = tp > 1
        t.micro_batch_size = -micro
        per_step = t.micro_batch_size * dp
        t.global_batch_size = max(per_step, round(batch_sequences / per_step) * per_step)
        if memory_per_rank(cfg, vocab, dp, bf16=True).total_bytes <= budget:
            try:
                validate(cfg, world_size=gpus, vocab_size=vocab, cuda=True)
            except ConfigError:
                continue
            return cfg
    raise PlanError(f"no layout of {gpus} GPUs with {memory_gib:g} GiB fits the "
                    f"{m.num_layers}x{m.hidden_size} model (TP <= {GPUS_PER_NODE}, full "
                    f"recompute tried); use more GPUs or a smaller model (--params)")


@dataclass
class Plan:
    law: ScalingLaw
    flops: float
    params: float
    tokens: float
    cfg: Config
    vocab: int
    gpus: int
    gpu: str
    mfu: float
    tokens_per_second: float
    wall_seconds: float
    predicted_loss: float


def batch_tokens_for(flops: float) -> float:
    """DeepSeek LLM (2024, eq. 1) compute-optimal batch size in tokens: 0.292 C^0.3271."""
    return 0.292 * flops ** 0.3271


def lr_for(flops: float) -> float:
    """DeepSeek LLM (2024, eq. 1) compute-optimal learning rate: 0.3118 C^-0.125."""
    return 0.3118 * flops ** -0.125


def make_plan(law: ScalingLaw, gpus: int, gpu: str, mfu: float, vocab: int, seq_length: int,
              memory_gib: float, flops: float | None = None, params: float | None = None,
              tokens: float | None = None) -> Plan:
    peak = peak_tflops(gpu.upper())
    if flops is None and not (params and tokens):
        raise PlanError("give the budget as --flops, --days (with --gpus, --gpu), or both "
                        "--params and --tokens")
    fixed = bool(params and tokens)
    if fixed:
        flops = 6.0 * params * tokens
    elif params:
        tokens = law.tokens_for(params)
        flops = 6.0 * params * tokens
    elif tokens:
        params = law.params_for(tokens)
        flops = 6.0 * params * tokens
    else:
        params, tokens = law.optimal(flops)
    cfg = model_shape(params, vocab, seq_length)
    batch = max(1, round(batch_tokens_for(flops) / seq_length))
    cfg = choose_layout(cfg, gpus, vocab, memory_gib, batch)
    n = matmul_parameters(cfg, vocab)
    per_token = flops_per_token(cfg, vocab)
    if not fixed:
        # The shape's own cost per token (6N plus attention) spends the budget.
        tokens = flops / per_token
    t, o = cfg.train, cfg.optim
    t.steps = max(1, math.ceil(tokens / (t.global_batch_size * seq_length)))
    o.lr = round(lr_for(flops), 6)
    o.min_lr = round(o.lr / 10, 7)
    o.schedule, o.decay_fraction = "wsd", 0.2
    o.warmup_steps = min(2000, max(1, t.steps // 100))
    cfg.train.log_interval = 10
    cfg.train.eval_interval = max(1, min(1000, t.steps // 20))
    cfg.checkpoint.interval = max(1, min(1000, t.steps // 50))
    throughput = gpus * (peak or 0.0) * 1e12 * mfu / per_token
    wall = tokens / throughput if throughput else float("nan")
    return Plan(law, tokens * per_token, n, tokens, cfg, vocab, gpus, gpu, mfu, throughput, wall,
                law.loss(n, tokens))
