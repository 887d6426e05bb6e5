"""optim.z_loss (PaLM's auxiliary loss): the backpropagated loss and its gradients equal a
plain-PyTorch cross entropy + z * logsumexp(logits)^2 on the same model, the reported loss
stays the cross entropy, and z_loss=0 is megatron's own loss path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pretrain.parallel.schedule import _forward_step

Z = 0.05  # large enough that the term moves the gradients far beyond rounding


def _micro(vocab: int, batch: int = 2, seq: int = 16):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    loss_mask = torch.ones(batch, seq)
    loss_mask[0, :3] = 0.0  # masked tokens count in neither term
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    return SimpleNamespace(tokens=tokens, labels=labels, loss_mask=loss_mask,
                           position_ids=positions, segment_ids=None)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("z_loss", [0.0, Z])
def test_z_loss_matches_plain_pytorch(smoke_config, build_model, z_loss):
    cfg = smoke_config(f"optim.z_loss={z_loss}")
    (model,) = build_model(cfg)
    micro = _micro(257)

    model.zero_grad()
    output, loss_func = _forward_step(iter([micro]), model, z_loss=z_loss)
    loss, num_tokens, report = loss_func(output)
    loss.backward()
    ours = _grads(model)

    model.zero_grad()
    logits = model(input_ids=micro.tokens, position_ids=micro.position_ids,
                   attention_mask=None, labels=None)  # [b, s, padded vocab]
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), micro.labels.flatten(),
                                    reduction="none").view_as(micro.loss_mask)
    z_term = torch.logsumexp(logits, dim=-1).square()
    expected = ((cross_entropy + z_loss * z_term) * micro.loss_mask).sum()
    expected.backward()

    assert int(num_tokens) == int(micro.loss_mask.sum())
    assert float(report["loss_sum"]) == pytest.approx(
        float((cross_entropy * micro.loss_mask).sum()), rel=1e-5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for mine, reference in zip(ours, _grads(model)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    if z_loss:
        assert float(loss) > float(report["loss_sum"]) * 1.01  # the term is really there
