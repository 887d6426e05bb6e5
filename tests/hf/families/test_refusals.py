"""What the families cannot express is refused in one line naming it: on import (config.json
fields), on export (our settings) and in the config (model.rope_scaling, model.head_dim)."""

from __future__ import annotations

import pytest

from pretrain.errors import CheckpointError, ConfigError

QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "hidden_act": "silu", "use_sliding_window": False,
         "sliding_window": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": True}


def test_qwen2_fields():
    from pretrain.hf.families import model_fields

    fields = model_fields(QWEN2, "hf:q")
    assert fields["qkv_bias"] and not fields["qk_norm"] and fields["rotary_base"] == 1000000
    assert fields["head_dim"] == 16 and fields["rope_scaling"] == {}


@pytest.mark.parametrize("edit, message", [
    ({"use_sliding_window": True}, "config.json use_sliding_window=True; only False imports"),
    ({"model_type": "mistral"}, "model_type='mistral'; only 'llama', 'qwen2', 'qwen3'"),
    ({"architectures": ["Qwen2ForSequenceClassification"]},
     "architectures=['Qwen2ForSequenceClassification']; only Qwen2ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_type='yarn' is not supported; only default and llama3"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "llama3 RoPE scaling lacks low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": True},
     "attention_bias=True; only False imports"),
    ({"mlp_bias": True}, "mlp_bias=True; only False imports"),
])
def test_unsupported_config_is_one_line(edit, message):
    from pretrain.hf.families import model_fields

    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        model_fields({**QWEN2, **edit}, "hf:q")
    assert "\n" not in str(err.value)


def test_export_family_follows_the_settings():
    from pretrain.hf.families import check_exportable

    model = {"position_embedding": "rope", "normalization": "rmsnorm", "activation": "swiglu",
             "bias": False}
    assert check_exportable(model, "c") == "llama"
    assert check_exportable({**model, "qkv_bias": True}, "c") == "qwen2"
    assert check_exportable({**model, "qk_norm": True}, "c") == "qwen3"
    with pytest.raises(CheckpointError, match="qkv_bias=true with model.qk_norm=true"):
        check_exportable({**model, "qkv_bias": True, "qk_norm": True}, "c")


@pytest.mark.parametrize("override, message", [
    ("model.rope_scaling={type: yarn, factor: 4}", "give exactly {type: llama3"),
    ("model.rope_scaling={type: llama3, factor: 8}", "wrong keys: high_freq_factor"),
    ("model.rope_scaling={type: llama3, factor: 0.5, low_freq_factor: 1, high_freq_factor: 4, "
     "original_max_position_embeddings: 32}", "model.rope_scaling.factor=0.5 must be >= 1"),
    ("model.head_dim=-2", "model.head_dim"),
    ("model.head_dim=15", "RoPE needs an even head dimension, got 15"),
])
def test_bad_decoder_options_name_the_field(override, message):
    from pretrain.config import load_config, validate
    from tests.conftest import SMOKE

    with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
        validate(load_config(SMOKE, [override]), world_size=1, vocab_size=257)


def test_llama3_frequencies_follow_the_three_bands():
    import math

    import torch

    from pretrain.model.layers import llama3_inverse_frequencies

    inverse = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    scaled = llama3_inverse_frequencies(inverse, 8.0, 1.0, 4.0, 32)
    wavelength = 2 * math.pi / inverse
    assert torch.equal(scaled[wavelength < 8], inverse[wavelength < 8])
    assert torch.allclose(scaled[wavelength > 32], inverse[wavelength > 32] / 8)
    middle = (wavelength >= 8) & (wavelength <= 32)
    assert middle.any() and (scaled[middle] < inverse[middle]).all()
    assert (scaled[middle] > inverse[middle] / 8).all()
