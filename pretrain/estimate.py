"""Analytic parameter counts and a per-rank memory estimate, for `--dry-run` and planning.

The parameter formula is tested against the built model. Memory follows DeepSpeed's ZeRO
accounting: with bf16, 2-byte weights and gradients plus 12 bytes of fp32 master weights
and Adam moments per parameter; in fp32, 4 + 4 + 8 bytes. Stage 1 shards the optimizer
state over data-parallel ranks, stage 2 also the gradients, stage 3 also the weights.
Activations use the Korthikanti et al. (2022) count for a flash-attention layer, with the
1F1B schedule keeping up to `pipeline_parallel` micro-batches in flight on the first stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, pad_vocab


def layer_parameters(cfg: Config) -> int:
    m = cfg.model
    h, f = m.hidden_size, m.ffn_size
    head_dim = h // m.num_attention_heads
    qkv_out = (m.num_attention_heads + 2 * m.query_groups) * head_dim
    norm = 2 * h if m.normalization == "layernorm" else h
    attn = h * qkv_out + m.num_attention_heads * head_dim * h
    mlp = h * f * (2 if m.activation == "swiglu" else 1) + f * h
    bias = (qkv_out + h + f * (2 if m.activation == "swiglu" else 1) + h) if m.bias else 0
    return attn + mlp + 2 * norm + bias


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
    """Parameters held by one TP rank of pipeline stage `pp_rank` (worst case over TP ranks)."""
    m, p = cfg.model, cfg.parallel
    counts = parameter_counts(cfg, vocab_size)
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    h = m.hidden_size
    norm = (2 if m.normalization == "layernorm" else 1) * h
    # Within a layer the two norms (and row-parallel biases) are replicated across TP.
    replicated = 2 * norm + (2 * h if m.bias else 0)
    per_layer = (layer_parameters(cfg) - replicated) // tp + replicated
    count = per_layer * (m.num_layers // pp)
    vocab = counts["padded_vocab_size"]
    if pp_rank == 0:
        count += vocab * h // tp + (m.max_seq_length * h if m.position_embedding == "learned" else 0)
    if pp_rank == pp - 1:
        count += norm
        if not m.tie_embeddings or pp > 1:
            count += vocab * h // tp
    return count


@dataclass
class MemoryEstimate:
    parameters: int  # on the largest rank
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def memory_per_rank(cfg: Config, vocab_size: int, data_parallel: int, bf16: bool) -> MemoryEstimate:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    params = max(rank_parameters(cfg, vocab_size, r) for r in range(p.pipeline_parallel))
    weight, grad = (2, 2) if bf16 else (4, 4)
    optimizer = 12 if bf16 else 8  # fp32 master + Adam m, v  |  Adam m, v
    dp = data_parallel
    weights = params * weight / (dp if p.zero_stage >= 3 else 1)
    grads = params * grad / (dp if p.zero_stage >= 2 else 1)
    optim = params * optimizer / (dp if p.zero_stage >= 1 else 1)
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
    in_flight = min(p.pipeline_parallel, max(1, t.global_batch_size // (b * dp)))
    activations = per_layer * layers_here * in_flight
    return MemoryEstimate(params, int(weights), int(grads), int(optim), int(activations))


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
        f"  activations {human_bytes(mem.activation_bytes)} (micro-batch {cfg.train.micro_batch_size}, "
        f"seq {cfg.train.seq_length}, recompute {cfg.parallel.recompute})",
        f"  total       {human_bytes(mem.total_bytes)}",
    ]
    return "\n".join(lines)
