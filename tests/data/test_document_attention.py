"""Per-document attention inside a packed sample is exact: the second document's token
losses equal those of the same document run on its own."""

from __future__ import annotations

import pytest
import torch

from pretrain.data.loader import document_causal_mask


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_packed_document_matches_the_document_alone(smoke_config, build_model,
                                                    position_embedding):
    cfg = smoke_config(f"model.position_embedding={position_embedding}", "model.dropout=0.0")
    model = build_model(cfg)[0].eval()
    generator = torch.Generator().manual_seed(0)
    doc_a = torch.randint(0, 257, (1, 7), generator=generator)
    doc_b = torch.randint(0, 257, (1, 12), generator=generator)
    packed = torch.cat([doc_a, doc_b], dim=1)  # [1, 19]
    inputs, labels = packed[:, :-1], packed[:, 1:]
    segments = torch.tensor([[0] * 7 + [1] * 11], dtype=torch.int32)
    positions = torch.tensor([list(range(7)) + list(range(11))])
    with torch.no_grad():
        packed_loss = model(input_ids=inputs, position_ids=positions,
                            attention_mask=document_causal_mask(segments), labels=labels)
        alone_loss = model(input_ids=doc_b[:, :-1], position_ids=torch.arange(11).unsqueeze(0),
                           attention_mask=None, labels=doc_b[:, 1:])
        leaky_loss = model(input_ids=inputs, position_ids=torch.arange(18).unsqueeze(0),
                           attention_mask=None, labels=labels)
    torch.testing.assert_close(packed_loss[:, 7:], alone_loss, rtol=1e-5, atol=1e-5)
    # Without the mask, doc_b sees doc_a: the check above is not vacuous.
    assert not torch.allclose(leaky_loss[:, 7:], alone_loss, rtol=1e-4, atol=1e-4)
