"""The analytic parameter counts and memory estimate, checked against built megatron models."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import validate
from pretrain.model.estimate import rank_parameter_list, memory_per_rank, parameter_counts, rank_parameters
from pretrain.model.gpt import count_parameters

VOCAB = 257

VARIANTS = {
    "rmsnorm-swiglu-rope-tied": [],
    "layernorm-gelu-learned-untied-bias": [
        "model.normalization=layernorm", "model.activation=gelu",
        "model.position_embedding=learned", "model.tie_embeddings=false", "model.bias=true"],
    "gqa": ["model.num_query_groups=2"],
    "gqa-untied-bias-default-ffn": ["model.num_query_groups=2", "model.tie_embeddings=false",
                                    "model.bias=true", "model.ffn_hidden_size=0"],
    # Qwen2/Qwen3 options: q/k/v biases only, per-head q/k norms, head_dim != hidden/heads
    "gqa-qkv-bias-qk-norm-head-dim": ["model.num_query_groups=2", "model.qkv_bias=true",
                                      "model.qk_norm=true", "model.head_dim=32"],
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_config(request, smoke_config):
    return smoke_config(*VARIANTS[request.param])


def test_total_matches_built_model(variant_config, build_model):
    chunks = build_model(variant_config)
    counts = parameter_counts(variant_config, VOCAB)
    assert counts["total"] == count_parameters(chunks)
    assert counts["padded_vocab_size"] == 384


def test_parts_match_built_model(variant_config, build_model):
    (model,) = build_model(variant_config)
    counts = parameter_counts(variant_config, VOCAB)
    params = dict(model.named_parameters())
    embedding = sum(p.numel() for n, p in params.items() if n.startswith("embedding."))
    layers = sum(p.numel() for n, p in params.items() if n.startswith("decoder.layers."))
    final_norm = sum(p.numel() for n, p in params.items() if n.startswith("decoder.final_layernorm"))
    output = sum(p.numel() for n, p in params.items() if n.startswith("output_layer."))
    assert counts["embedding"] == embedding
    assert counts["layers"] == layers
    assert counts["final_norm"] == final_norm
    assert counts["output"] == output
    assert counts["non_embedding"] == layers + final_norm


def test_rank_parameters_single_rank_is_total(variant_config):
    counts = parameter_counts(variant_config, VOCAB)
    assert rank_parameters(variant_config, VOCAB, 0) == counts["total"]


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_parameters_tensor_parallel_matches_partitioning(smoke_config, build_model, tp):
    """The TP=1 model's parameters carry megatron's partitioning attributes; dividing the
    partitioned ones by TP gives what one TP rank holds."""
    for overrides in (VARIANTS["rmsnorm-swiglu-rope-tied"],
                      VARIANTS["layernorm-gelu-learned-untied-bias"],
                      VARIANTS["gqa-qkv-bias-qk-norm-head-dim"]):
        cfg = smoke_config(*overrides)
        (model,) = build_model(cfg)
        expected = sum(p.numel() // tp if getattr(p, "tensor_model_parallel", False) else p.numel()
                       for p in model.parameters())
        sharded = smoke_config(*overrides, f"parallel.tensor_parallel={tp}")
        assert rank_parameters(sharded, VOCAB, 0) == expected


def test_rank_parameters_pipeline_split(smoke_config):
    cfg = smoke_config("parallel.pipeline_parallel=2")
    total = parameter_counts(cfg, VOCAB)["total"]
    h, vocab = 64, 384
    first, last = rank_parameters(cfg, VOCAB, 0), rank_parameters(cfg, VOCAB, 1)
    # tied embeddings: the last stage holds its own copy of the word embedding
    assert first + last == total + vocab * h
    # same number of layers; the first adds the embedding, the last its copy and the final norm
    assert last - first == h
    assert first == vocab * h + 2 * (total - vocab * h - h) // 4


def _memory(smoke_config, stage: int, dp: int = 4, bf16: bool = True):
    cfg = smoke_config(f"parallel.zero_stage={stage}")
    return memory_per_rank(cfg, VOCAB, dp, bf16)


def test_memory_zero_stages(smoke_config):
    base = _memory(smoke_config, 0)
    params = parameter_counts(smoke_config(), VOCAB)["total"]
    assert base.parameters == params
    assert base.weight_bytes == 2 * params
    assert base.grad_bytes == 2 * params
    assert base.optimizer_bytes == 12 * params

    s1, s2, s3 = (_memory(smoke_config, s) for s in (1, 2, 3))
    # stage 1: only the optimizer state is sharded over the 4 data-parallel ranks (each
    # optimizer group is padded to a multiple of 2 x DP elements before the cut)
    padding = 12 * 2 * 4 * 2
    assert base.optimizer_bytes // 4 <= s1.optimizer_bytes <= base.optimizer_bytes // 4 + padding
    assert (s1.grad_bytes, s1.weight_bytes) == (base.grad_bytes, base.weight_bytes)
    # stage 2: gradients too, but a rank keeps every parameter overlapping its partition whole:
    # at least its 1/DP share, at most that plus the two largest parameters
    assert s2.optimizer_bytes == s1.optimizer_bytes
    largest = 2 * max(n for n, _ in rank_parameter_list(smoke_config(), VOCAB, 0))
    assert base.grad_bytes // 4 <= s2.grad_bytes <= base.grad_bytes // 4 + 2 * largest
    assert s2.weight_bytes == base.weight_bytes
    # stage 3: weights too, each a plain 1/DP share
    assert s3.optimizer_bytes == -(-params // 4) * 12
    assert s3.grad_bytes == -(-params // 4) * 2
    assert s3.weight_bytes == -(-params // 4) * 2
    # activations do not depend on ZeRO
    assert len({m.activation_bytes for m in (base, s1, s2, s3)}) == 1
    assert s3.total_bytes < s2.total_bytes < s1.total_bytes < base.total_bytes


def test_memory_fp32_bytes(smoke_config):
    fp32 = _memory(smoke_config, 0, dp=1, bf16=False)
    assert (fp32.weight_bytes, fp32.grad_bytes, fp32.optimizer_bytes) == (
        4 * fp32.parameters, 4 * fp32.parameters, 8 * fp32.parameters)


def test_memory_zero1_with_dp1_is_unsharded(smoke_config):
    assert _memory(smoke_config, 1, dp=1).optimizer_bytes == _memory(smoke_config, 0, dp=1).optimizer_bytes


def _one_b_config(smoke_config, *extra):
    return smoke_config("model.num_layers=24", "model.hidden_size=2048",
                        "model.num_attention_heads=16", "model.ffn_hidden_size=5632",
                        "model.max_seq_length=2048", "model.tie_embeddings=true", *extra)


def test_1b_parameter_count(smoke_config):
    cfg = _one_b_config(smoke_config)
    counts = parameter_counts(cfg, 32000)
    # by hand: per layer QKV 2048x6144 + proj 2048x2048 + SwiGLU 3x2048x5632 + 2 RMSNorm gains
    per_layer = 2048 * 6144 + 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    expected = 24 * per_layer + 32000 * 2048 + 2048  # + tied embedding + final norm
    assert counts["padded_vocab_size"] == 32000
    assert counts["total"] == expected == 1_298_761_728
    assert 1.1e9 < counts["total"] < 1.3e9


def test_1b_gqa_parameter_count(smoke_config):
    cfg = _one_b_config(smoke_config, "model.num_query_groups=4")
    counts = parameter_counts(cfg, 32000)
    head_dim = 128
    qkv = 2048 * (16 + 2 * 4) * head_dim
    per_layer = qkv + 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    assert counts["total"] == 24 * per_layer + 32000 * 2048 + 2048
    assert 1.1e9 < counts["total"] < 1.3e9


def test_1b_flops_per_token_and_mfu_by_hand():
    """configs/pretrain_1b.yaml's model at seq 2048: FLOPs per token counted by hand, and the
    MFU it gives for the step time measured on an H200 (shared notes: 0.614 s per step of
    16 x 2048 tokens on one GPU = 43.7% of 989 TFLOP/s)."""
    import torch

    from pretrain.config import load_config
    from pretrain.model.estimate import flops_per_token, peak_tflops
    from pretrain.trainer.loop import Throughput

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain_1b.yaml",
                      ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                       "parallel.sequence_parallel=false"])
    # by hand, GQA with 4 groups (head_dim 128): QKV 2048 x (16 + 2*4) x 128, output
    # projection 2048 x 2048, SwiGLU 3 x 2048 x 5632, two RMSNorm gains, per layer
    per_layer = 2048 * 3072 + 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    matmul_params = 24 * per_layer + 2048 + 32000 * 2048  # + final norm + logits (tied)
    assert matmul_params == 1_147_766_784
    expected = 6 * matmul_params + 12 * 24 * 2048 * 2048
    assert flops_per_token(cfg, 32000) == expected == 8_094_560_256

    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future Accelerator") is None

    cfg.logging.peak_tflops = 989.0
    layout = validate(cfg, world_size=1, vocab_size=32000)
    metrics = Throughput(cfg, layout, torch.device("cpu")).metrics(16 * 2048, 0.614)
    assert metrics["mfu"] == pytest.approx(0.437, abs=0.001)
    assert metrics["tflops_per_gpu"] == pytest.approx(16 * 2048 * expected / 0.614 / 1e12)
    # Eight GPUs doing the same tokens in the same time each do an eighth of the work.
    layout8 = validate(cfg, world_size=8, vocab_size=32000)
    eight = Throughput(cfg, layout8, torch.device("cpu")).metrics(16 * 2048, 0.614)
    assert eight["mfu"] == pytest.approx(metrics["mfu"] / 8)


def test_flops_per_token_counts_attention_at_heads_times_head_dim(smoke_config):
    """model.head_dim wider than hidden/heads (Qwen3: 64 hidden, 4 heads of 32) widens
    attention's QK^T and AV products: 12 x layers x heads x head_dim x seq, not x hidden;
    the 6N term takes the wider q/k/v/output projections from the parameter count."""
    from pretrain.model.estimate import flops_per_token

    vocab = 257
    plain = smoke_config("model.num_query_groups=2")
    wide = smoke_config("model.num_query_groups=2", "model.head_dim=32")
    m, seq = wide.model, wide.train.seq_length
    assert m.hidden_size == 64 and m.num_attention_heads == 4
    for cfg, width in ((plain, 64), (wide, 4 * 32)):
        counts = parameter_counts(cfg, vocab)
        matmul = counts["non_embedding"] + counts["padded_vocab_size"] * 64
        assert flops_per_token(cfg, vocab) == 6 * matmul + 12 * m.num_layers * width * seq
    # q/k/v: 64 x (4 + 2 x 2) x 32 and output 4 x 32 x 64 per layer, against 64 x 8 x 16 + 64 x 64
    extra = m.num_layers * ((64 * 8 * 32 + 128 * 64) - (64 * 8 * 16 + 64 * 64))
    assert (parameter_counts(wide, vocab)["non_embedding"]
            - parameter_counts(plain, vocab)["non_embedding"]) == extra
