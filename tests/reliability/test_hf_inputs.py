"""An HF model directory is input from outside: a config.json with a missing key or a value of
the wrong type, a truncated safetensors file, and a safetensors index naming files outside
the directory (which was read) were tracebacks or worse; each is now one CheckpointError line
(exit 2 from the CLI, like every other checkpoint error)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pretrain.errors import CheckpointError
from pretrain.hf.families import model_fields
from pretrain.hf.importer import read_safetensors

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 384, "rms_norm_eps": 1e-5}


@pytest.mark.parametrize("config, needle", [
    ({k: v for k, v in LLAMA.items() if k != "num_attention_heads"},
     "config.json has no num_attention_heads"),
    ({**LLAMA, "hidden_size": "64"}, "config.json hidden_size='64' is not a positive integer"),
    ({**LLAMA, "num_key_value_heads": 2.5}, "num_key_value_heads=2.5 is not a positive integer"),
    ({**LLAMA, "num_hidden_layers": True}, "num_hidden_layers=True is not a positive integer"),
    ({**LLAMA, "rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' is not a number in (0, 1)"),
    ([LLAMA], "config.json holds a list, not a JSON object"),
])
def test_a_config_json_of_the_wrong_shape_is_one_line(config, needle):
    with pytest.raises(CheckpointError) as err:
        model_fields(config, "hf:x")
    assert str(err.value).startswith("hf:x: ") and needle in str(err.value)


def test_the_index_never_leads_outside_the_model_directory(tmp_path):
    model, outside = tmp_path / "model", tmp_path / "outside.safetensors"
    model.mkdir()
    save_file({"secret": torch.ones(2)}, str(outside))
    for name in ("../outside.safetensors", str(outside), "sub/x.safetensors"):
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))
        with pytest.raises(CheckpointError, match="refusing to read outside the model directory"):
            read_safetensors(model)
    (model / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_safetensors(model)


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    save_file({"w": torch.arange(1000.0)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors .*"
                                              r"truncated or not safetensors"):
        read_safetensors(tmp_path)
