"""What a checkpoint records about the run that wrote it (model shape, layout, tokenizer),
and the check that refuses one this run cannot continue, with one line naming the field."""

from __future__ import annotations

from pathlib import Path

from pretrain.errors import CheckpointError

MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size",
                "activation", "normalization", "position_embedding", "tie_embeddings", "bias")


def model_signature(cfg, padded_vocab_size: int) -> dict:
    m = cfg.model
    sig = {f"model.{name}": getattr(m, name) for name in MODEL_FIELDS}
    sig["padded_vocab_size"] = padded_vocab_size
    if m.position_embedding == "learned":
        sig["model.max_seq_length"] = m.max_seq_length
    return sig


def layout_key(cfg, layout) -> dict:
    return {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel,
            "virtual_pipeline_chunks": cfg.parallel.virtual_pipeline_chunks}


def check_compatible(path: Path, state: dict, cfg, padded_vocab_size: int, data) -> None:
    """Refuse a checkpoint of another model shape or tokenizer than this run's."""
    want = model_signature(cfg, padded_vocab_size)
    have = state["model"]
    diffs = [f"{k}={have.get(k)!r} there, {v!r} here" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} holds a different model: {'; '.join(diffs)}. Resume with "
                              f"the checkpoint's model settings, or use a new run.dir")
    tok = state["tokenizer"]
    if tok["sha256"] != data.train[0].tokenizer_sha256:
        raise CheckpointError(
            f"{path} was trained on data tokenized with tokenizer sha256 {tok['sha256'][:12]}, "
            f"but data.train uses {data.train[0].tokenizer_sha256[:12]}; token ids would "
            f"mean different text. Use data tokenized with the checkpoint's tokenizer")
    if tok["vocab_size"] != data.vocab_size:
        raise CheckpointError(f"{path}: tokenizer vocabulary {tok['vocab_size']} there, "
                              f"{data.vocab_size} here")
