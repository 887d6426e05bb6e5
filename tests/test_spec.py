"""Backend choice. Transformer Engine cannot be installed on these CPU machines, so its
availability is faked (monkeypatch) to check the decision logic; the real TE path runs in
tests/test_gpu.py on a GPU machine."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError
from pretrain.model import spec


def test_auto_picks_local_without_te():
    assert spec.choose_backend("auto") == "local"


def test_explicit_te_without_te_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backend=te needs transformer_engine"):
        spec.choose_backend("te")


def test_document_masks_keep_the_local_attention(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_usable", lambda: True)
    assert spec.choose_backend("auto") == "te"
    assert spec.choose_backend("auto", document_masks=True) == "local"
    with pytest.raises(ConfigError, match="data.reset_attention=true needs model.backend=local"):
        spec.choose_backend("te", document_masks=True)
