"""The checkpoint defines the model: with `checkpoint.load_from=hf:DIR` a run config needs no
`model` section; every architecture field comes from DIR/config.json, and one the run config
sets itself must agree (one line naming both values). Only config.json is read here: the
architecture is settled before any weight is."""

from __future__ import annotations

import json

import pytest
import yaml

from pretrain.config import load_config, model_keys_given, validate
from pretrain.errors import CheckpointError
from pretrain.hf.importer import adopt_architecture
from tests.conftest import SMOKE
from tests.launch_helpers import launch

QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "intermediate_size": 96, "vocab_size": 512, "rope_theta": 1000000.0,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 4096}


def _run_config(tmp_path, model: dict | None) -> tuple:
    """The smoke config with `model` replaced (None: no model section) and DIR/config.json."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(QWEN3))
    data = yaml.safe_load(SMOKE.read_text())
    data.pop("model")
    if model is not None:
        data["model"] = model
    data["checkpoint"] = {"load_from": f"hf:{hf}"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, f"hf:{hf}"


def test_a_run_config_without_a_model_section_takes_the_checkpoints(tmp_path):
    path, load_from = _run_config(tmp_path, None)
    cfg = load_config(path)
    assert model_keys_given(path) == set()
    adopt_architecture(cfg, model_keys_given(path), load_from)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.query_groups, m.kv_channels,
            m.ffn_size, m.rotary_base, m.norm_eps, m.vocab_size) == \
        (3, 64, 4, 2, 32, 96, 1000000, 1e-6, 512)
    assert m.qk_norm and not m.qkv_bias and m.tie_embeddings
    assert validate(cfg, world_size=1, vocab_size=257).padded_vocab_size == 512


def test_what_is_not_architecture_stays_the_run_configs(tmp_path):
    path, load_from = _run_config(tmp_path, {"dropout": 0.1, "max_seq_length": 64,
                                             "backend": "local", "num_layers": 3})
    cfg = load_config(path, ["model.compile=off"])
    given = model_keys_given(path, ["model.compile=off"])
    assert given == {"dropout", "max_seq_length", "backend", "num_layers", "compile"}
    adopt_architecture(cfg, given, load_from)  # num_layers=3 agrees
    assert (cfg.model.dropout, cfg.model.max_seq_length, cfg.model.compile) == (0.1, 64, "off")


@pytest.mark.parametrize("model, overrides, needle", [
    ({"hidden_size": 128}, [], "config.json hidden_size=64 but model.hidden_size=128 here"),
    (None, ["model.head_dim=16"], "config.json head_dim=32 but model.head_dim=16 here"),
    ("tiny", [], "but model.num_layers=4 here"),  # a preset sets every key it names
])
def test_a_model_section_that_disagrees_is_one_line(tmp_path, model, overrides, needle):
    path, load_from = _run_config(tmp_path, model)
    cfg = load_config(path, overrides)
    with pytest.raises(CheckpointError) as err:
        adopt_architecture(cfg, model_keys_given(path, overrides), load_from)
    assert str(err.value).startswith(f"{load_from}: ") and needle in str(err.value)
    assert "or drop it from the run config" in str(err.value)


@pytest.mark.slow
def test_the_training_cli_plans_the_checkpoints_model(tmp_path):
    """A dry run (config, data, layout; no weights read) of a run config without a model
    section prints the model config.json defines."""
    path, _ = _run_config(tmp_path, None)
    out = launch(["-m", "pretrain.train", "--config", str(path), "--dry-run",
                  f"run.dir={tmp_path / 'run'}"], 1, 120, "dry run")
    model = yaml.safe_load(out.stdout.split("\nparameters:", 1)[0])["model"]
    assert (model["num_layers"], model["head_dim"], model["qk_norm"], model["vocab_size"]) == \
        (3, 32, True, 512)
