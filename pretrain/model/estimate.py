"""Analytic parameter counts and a per-rank memory estimate, for `--dry-run` and planning.

The parameter formula is tested against the built model. Memory follows DeepSpeed's ZeRO
accounting, measured in tests/parity/test_zero_memory.py: 12 bytes of optimizer state per
parameter (fp32 master copy + Adam moments; DeepSpeed clones the master even when the
weights are fp32) except fp32 without ZeRO (8: AdamW updates the weights in place).
Stage 1 shards the optimizer state over data-parallel ranks, stage 2 also the gradients,
stage 3 also the weights. Stages 1-2 flatten each optimizer group, pad it to 2 x DP elements
and cut it into DP equal parts; a ZeRO-2 rank keeps the full gradient of every parameter
that overlaps its part, reproduced here from the parameters in module order.
Activations use the Korthikanti et al. (2022) count for a flash-attention layer, with the
1F1B schedule keeping up to `pipeline_parallel` micro-batches in flight on the first stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, pad_vocab
from pretrain.parallel import REDUCE_BUCKET_ELEMENTS


def layer_parameters(cfg: Config) -> int:
    m = cfg.model
    h, f = m.hidden_size, m.ffn_size
    head_dim = m.kv_channels
    qkv_out = (m.num_attention_heads + 2 * m.query_groups) * head_dim
    norm_params = 2 if m.normalization == "layernorm" else 1
    norm = norm_params * h
    attn = h * qkv_out + m.num_attention_heads * head_dim * h
    mlp = h * f * (2 if m.activation == "swiglu" else 1) + f * h
    bias = (qkv_out + h + f * (2 if m.activation == "swiglu" else 1) + h) if m.bias else 0
    bias += qkv_out if m.qkv_bias and not m.bias else 0
    qk_norm = 2 * norm_params * head_dim if m.qk_norm else 0
    return attn + mlp + 2 * norm + bias + qk_norm


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Whole-model counts (unsharded), using the TP-padded vocabulary."""
    m = cfg.model
    vocab = pad_vocab(max(vocab_size, m.vocab_size), cfg)
    embedding = vocab * m.hidden_size
    position = m.max_seq_length * m.hidden_size if m.position_embedding == "learned" else 0
    final_norm = (2 if m.normalization == "layernorm" else 1) * m.hidden_size
    output = 0 if m.tie_embeddings else vocab * m.hidden_size
    layers = m.num_layers * layer_parameters(cfg)
    total = embedding + position + layers + final_norm + output
    return {"embedding": embedding + position, "layers": layers, "final_norm": final_norm,
            "output": output, "total": total, "non_embedding": layers + final_norm,
            "padded_vocab_size": vocab}


def rank_parameters(cfg: Config, vocab_size: int, pp_rank: int) -> int:
    """Parameters held by one TP rank of pipeline stage `pp_rank`."""
    return sum(n for n, _ in rank_parameter_list(cfg, vocab_size, pp_rank))


def rank_parameter_list(cfg: Config, vocab_size: int, pp_rank: int) -> list[tuple[int, bool]]:
    """(elements, is_matrix) of one TP rank's parameters on stage `pp_rank`, in megatron's
    module order (local spec): embedding, then per layer input norm, attention output and
    QKV projections, MLP norm, fc1, fc2; final norm and output layer last."""
    m, p = cfg.model, cfg.parallel
    tp, pp, h, f = p.tensor_parallel, p.pipeline_parallel, m.hidden_size, m.ffn_size
    head_dim = m.kv_channels
    qkv_out = (m.num_attention_heads + 2 * m.query_groups) * head_dim
    vocab = parameter_counts(cfg, vocab_size)["padded_vocab_size"]
    norm = [(h, False)] + ([(h, False)] if m.normalization == "layernorm" else [])
    fc1_out = f * (2 if m.activation == "swiglu" else 1)

    def linear(rows, cols, column_parallel, bias=m.bias):
        weight = [(rows * cols // tp, True)]
        if not bias:
            return weight
        return weight + [((rows // tp) if column_parallel else rows, False)]

    # megatron's attention registers its q and k norms (replicated) after the projections
    qk_norm = [(head_dim, False)] * (2 if m.normalization == "layernorm" else 1) * 2 \
        if m.qk_norm else []

    out: list[tuple[int, bool]] = []
    if pp_rank == 0:
        out.append((vocab * h // tp, True))
        if m.position_embedding == "learned":
            out.append((m.max_seq_length * h, True))
    layer = (norm + linear(h, m.num_attention_heads * head_dim, False)
             + linear(qkv_out, h, True, m.bias or m.qkv_bias) + qk_norm + norm + linear(fc1_out, h, True) + linear(h, f, False))
    out += layer * (m.num_layers // pp)
    if pp_rank == pp - 1:
        out += norm
        if not m.tie_embeddings or pp > 1:
            out.append((vocab * h // tp, True))
    return out


def zero12_partition(group_numels: list[list[int]], dp: int, rank: int) -> tuple[int, int]:
    """DeepSpeed ZeRO-1/2 partitioning: (elements of this rank's fp32 partition, elements of
    the gradients it keeps at ZeRO-2: every parameter starting in or straddling into it)."""
    partition, grads = 0, 0
    for numels in group_numels:
        alignment = 2 * dp
        size = -(-sum(numels) // alignment) * alignment // dp
        start, end = size * rank, size * (rank + 1)
        offset = 0
        for n in numels:
            if start <= offset < end or offset < start < offset + n:
                grads += n
            offset += n
        partition += size
    return partition, grads


@dataclass
class MemoryEstimate:
    parameters: int  # on the largest rank
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    comm_buffer_bytes: int = 0  # DeepSpeed's reduce bucket (ZeRO >= 1)

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.grad_bytes + self.optimizer_bytes
                + self.activation_bytes + self.comm_buffer_bytes)


def memory_per_rank(cfg: Config, vocab_size: int, data_parallel: int, bf16: bool) -> MemoryEstimate:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp, stage = data_parallel, p.zero_stage
    weight, grad = (2, 2) if bf16 else (4, 4)
    optimizer = 12 if (bf16 or stage >= 1) else 8  # [master 4 +] Adam m, v 8
    worst = None
    for pp_rank in range(p.pipeline_parallel):
        params = rank_parameter_list(cfg, vocab_size, pp_rank)
        count = sum(n for n, _ in params)
        groups = [[n for n, matrix in params if matrix], [n for n, matrix in params if not matrix]]
        if stage in (1, 2):
            shares = [zero12_partition(groups, dp, r) for r in range(dp)]
            opt_elems = max(part for part, _ in shares)
            grad_elems = max(g for _, g in shares) if stage == 2 else count
        elif stage == 3:
            opt_elems = grad_elems = -(-count // dp)
        else:
            opt_elems = grad_elems = count
        weights = (-(-count // dp) if stage == 3 else count) * weight
        candidate = (count, weights, grad_elems * grad, opt_elems * optimizer)
        if worst is None or sum(candidate[1:]) > sum(worst[1:]):
            worst = candidate
    params, weights, grads, optim = worst
    s, b, h = t.seq_length, t.micro_batch_size, m.hidden_size
    layers_here = m.num_layers // p.pipeline_parallel
    bytes_per_value = 2 if bf16 else 4
    tp = p.tensor_parallel
    if p.recompute == "full":
        per_layer = s * b * h * bytes_per_value  # only the layer input is kept
    elif p.sequence_parallel:
        per_layer = s * b * h * 34 / tp * bytes_per_value / 2
    else:
        per_layer = s * b * h * (10 + 24 / tp) * bytes_per_value / 2
    if p.recompute == "selective" and "mlp" in p.recompute_modules:
        # The MLP's fc1 output (gate and up for SwiGLU) is recomputed, not kept. core_attn
        # saves next to nothing here: SDPA never stores the s x s scores these formulas omit.
        per_layer -= s * b * 2 * m.ffn_size / tp * bytes_per_value
    in_flight = min(p.pipeline_parallel, max(1, t.global_batch_size // (b * dp)))
    activations = per_layer * layers_here * in_flight
    comm = min(REDUCE_BUCKET_ELEMENTS, params) * grad if stage >= 1 else 0
    return MemoryEstimate(params, int(weights), int(grads), int(optim), int(activations), int(comm))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:8.2f} {unit}"
        n /= 1024
    return f"{n:8.2f} TiB"


def describe(cfg: Config, vocab_size: int, world_size: int, bf16: bool) -> str:
    counts = parameter_counts(cfg, vocab_size)
    dp = max(1, world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel))
    mem = memory_per_rank(cfg, vocab_size, dp, bf16)
    lines = [
        f"parameters: {counts['total']:,} total ({counts['non_embedding']:,} non-embedding), "
        f"padded vocabulary {counts['padded_vocab_size']:,}",
        f"layout: world {world_size} = TP {cfg.parallel.tensor_parallel} x PP "
        f"{cfg.parallel.pipeline_parallel} x DP {dp}, ZeRO-{cfg.parallel.zero_stage}, "
        f"{'bf16' if bf16 else 'fp32'}",
        f"memory per rank (estimate, largest stage, {mem.parameters:,} parameters):",
        f"  weights     {human_bytes(mem.weight_bytes)}",
        f"  gradients   {human_bytes(mem.grad_bytes)}",
        f"  optimizer   {human_bytes(mem.optimizer_bytes)}",
        f"  comm bucket {human_bytes(mem.comm_buffer_bytes)}",
        f"  activations {human_bytes(mem.activation_bytes)} (micro-batch {cfg.train.micro_batch_size}, "
        f"seq {cfg.train.seq_length}, recompute {cfg.parallel.recompute})",
        f"  total       {human_bytes(mem.total_bytes)}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- compute and MFU

def flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), as PaLM (Chowdhery et al.
    2022, appendix B) and Megatron-LM count them:

        6 * N  +  12 * num_layers * num_attention_heads * head_dim * seq_length

    N is every parameter that takes part in a matrix multiply: the transformer layers, the
    final norm and the output projection (padded vocabulary x hidden, counted once whether
    or not it is tied to the input embedding, whose lookup costs no FLOPs; learned position
    embeddings are excluded for the same reason). The second term is attention's QK^T and
    AV products (2 x 2 x s x heads x head_dim per layer and token, times 3 for training;
    heads x head_dim is hidden_size unless model.head_dim sets another width, as Qwen3's
    does), without the saving of the causal mask, as the reference numbers in BENCHMARKS.md
    are counted. Recomputation is not counted: MFU measures useful work, not hardware FLOPs."""
    counts = parameter_counts(cfg, vocab_size)
    m = cfg.model
    matmul_params = counts["non_embedding"] + counts["padded_vocab_size"] * m.hidden_size
    attention_width = m.num_attention_heads * m.kv_channels  # query heads x per-head width
    return 6.0 * matmul_params + 12.0 * m.num_layers * attention_width * cfg.train.seq_length


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name() in order: the first pattern contained in the name wins.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The accelerator's dense bf16 peak from its name, or None when it is not known."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return tflops
    return None
