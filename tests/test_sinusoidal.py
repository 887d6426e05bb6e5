"""model.position_embedding=sinusoidal: the fixed Vaswani et al. table, by hand, in place of
megatron's learned one (no position parameters), added to the word embedding."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.estimate import parameter_counts
from pretrain.model.layers import SinusoidalPositionEmbedding


def test_table_by_hand():
    table = SinusoidalPositionEmbedding(8, torch.float32)(torch.tensor([[0, 1, 5]]))
    assert table.shape == (1, 3, 8)
    assert table[0, 0].tolist() == [0.0, 1.0] * 4  # sin 0, cos 0
    for i in range(4):
        angle = 5 / 10000 ** (2 * i / 8)
        assert table[0, 2, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[0, 2, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_model_uses_the_table(smoke_config, build_model):
    cfg = smoke_config("model.position_embedding=sinusoidal")
    (model,) = build_model(cfg)
    names = [name for name, _ in model.named_parameters()]
    assert not any("position" in name for name in names)
    counts = parameter_counts(cfg, 257)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    tokens = torch.tensor([[3, 3, 3, 3]])
    positions = torch.tensor([[0, 1, 2, 3]])
    embedded_sbh = model.embedding(input_ids=tokens, position_ids=positions)
    word = model.embedding.word_embeddings(tokens)[0]  # [s, h]
    expected = word + SinusoidalPositionEmbedding(cfg.model.hidden_size, torch.float32)(positions)[0]
    torch.testing.assert_close(embedded_sbh[:, 0], expected)
    assert not torch.equal(embedded_sbh[0, 0], embedded_sbh[1, 0])  # same token, new position
