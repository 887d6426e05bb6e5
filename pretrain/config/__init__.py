"""The typed configuration tree: YAML files in configs/, dotted command-line overrides, and
every cross-field check in one place, each failing with one line that names the fix.

schema.py   the dataclass tree and its defaults, ConfigError
coerce.py   values checked against the tree's types; setting one key (apply_override)
load.py     YAML files, bundled config names, model presets, overrides; save_config
validate.py one check per section, validate(); check_run_dir
layout.py   sizes derived from a config and a world size (Layout, pad_vocab)
megatron_flags.py  Megatron-LM's flag spellings as our overrides
"""

from pretrain.config.coerce import apply_override, deep_merge, merge_into
from pretrain.config.layout import Layout, pad_vocab
from pretrain.config.load import (BUNDLED_CONFIGS, bundled_config_names, coerce_override,
                                  load_config, model_keys_given, resolve_config, save_config)
from pretrain.config.schema import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                   ModelConfig, OptimConfig, ParallelConfig, RunConfig,
                                   TrainConfig, WandbConfig)
from pretrain.config.validate import check_run_dir, validate
from pretrain.errors import ConfigError

__all__ = [
    "BUNDLED_CONFIGS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "Layout",
    "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig",
    "TrainConfig", "WandbConfig", "apply_override", "bundled_config_names", "check_run_dir",
    "coerce_override", "deep_merge", "load_config", "merge_into", "model_keys_given", "pad_vocab",
    "resolve_config", "save_config", "validate",
]
