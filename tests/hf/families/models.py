"""Tiny random models of each Hugging Face family we import (made here by transformers, no
network), the run overrides that describe them, and their loss on the run's first batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.hf.byte_tokenizer import save_byte_tokenizer

# The smoke config's byte-level corpus: 257 ids, padded to 384 rows as the run pads them.
VOCAB = 384
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, initializer_range=0.1)  # large: a layer mistake moves the loss
# original_max_position_embeddings 32 puts RoPE's 8 frequencies (head_dim 16) in all three
# bands of the llama3 scaling (kept, blended, divided by factor) at this model's lengths.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False,
                                  rope_parameters={"rope_type": "default",
                                                   "rope_theta": 1000000.0})),
    # head_dim 32 with hidden 64 / 4 heads: q/k/v are wider than hidden/heads
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
# the first global batch of the smoke config, on 2 ranks in every layout
BASE = ["train.steps=2", "train.exit_at_step=1", "optim.warmup_steps=1",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=48",
        "model.max_seq_length=64"]


def make(family: str, path: Path, seed: int = 5):
    """A random model of `family` saved (safetensors) under path; returns it (eval, fp32)."""
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, name)(**SHAPE, **extra)).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:  # away from 1: a missed or swapped norm shows
                param.uniform_(0.5, 1.5)
            elif param_name.endswith(".bias"):  # away from 0: a dropped bias shows
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    save_byte_tokenizer(path)  # the embedded corpus's tokenizer: the runs train on that corpus
    return model


def overrides(path: Path) -> list[str]:
    """model.* overrides equal to the config.json under path (what an import checks)."""
    from pretrain.hf.families import model_fields

    fields = model_fields(json.loads((path / "config.json").read_text()), str(path))
    return [f"model.{key}={json.dumps(value)}" for key, value in fields.items()]


def first_batch_loss(model, run_overrides: list[str]) -> float:
    """The HF model's token-mean loss on the run's first global batch (the real loader)."""
    from pretrain.config import load_config
    from pretrain.data.build import build_loaders, open_data
    from tests.conftest import SMOKE

    cfg = load_config(SMOKE, run_overrides)
    loader, _ = build_loaders(cfg, open_data(cfg), cfg.train.micro_batch_size, 0, 1)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for micro in loader.next_step():
            logits = model(micro.tokens).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), micro.labels.reshape(-1), reduction="none")
            total += float((losses * micro.loss_mask.reshape(-1)).sum())
            count += float(micro.loss_mask.sum())
    loader.close()
    return total / count
