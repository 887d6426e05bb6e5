"""`--config` by bundled name: found from any directory, `model: NAME` of a config outside the
checkout finds the bundled sizes, and a name that is nothing gets one line listing the names."""

from __future__ import annotations

import pytest

from pretrain.config import BUNDLED_CONFIGS, ConfigError, load_config, resolve_config


def test_bundled_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("1b").model.hidden_size == load_config("pretrain_1b").model.hidden_size == 2048
    assert load_config("smoke", ["train.steps=3"]).train.steps == 3
    assert resolve_config("smoke") == BUNDLED_CONFIGS / "smoke.yaml"


def test_own_config_finds_bundled_model_sizes(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("run:\n  dir: runs/mine\nmodel: tiny\n")
    assert load_config(own).model.num_layers == 4


def test_unknown_name_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("smok")
    message = str(err.value)
    assert "'smok'" in message and "smoke, " in message and "1b" in message and "\n" not in message
    (tmp_path / "smok").write_text("run:\n  dir: runs/x\n")  # a file of that name wins
    assert load_config("smok").run.dir == "runs/x"
