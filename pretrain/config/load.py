"""Reading a run config: a YAML file or a bundled config's name, its model preset, and dotted
`section.key=value` command-line overrides; writing the resolved config back.

A run config may name its model by size (`model: 1b`), which loads `configs/model/1b.yaml`
next to it; keys given in the run config's model section or on the command line win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pretrain.config.coerce import apply_override, merge_into, section_types
from pretrain.config.schema import Config
from pretrain.errors import ConfigError


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, "
                          f"e.g. configs/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); pass a YAML text file") from None
    if not data:  # an empty file would silently be a full default run
        raise ConfigError(f"{path} is empty; give at least run.dir and data.train, e.g. copy "
                          f"configs/smoke.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


# The configs shipped with the package (pretrain/configs, next to this package): a link to
# configs/ in a checkout, copied into the wheel.
BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def bundled_config_names() -> list[str]:
    """Names `--config` takes besides paths: configs/NAME.yaml (`pretrain_1b` also as `1b`)."""
    stems = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))
    return stems + [s.removeprefix("pretrain_") for s in stems if s.startswith("pretrain_")]


def resolve_config(name: str | Path) -> Path:
    """An existing file as given, else a bundled config by name (from any directory)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path  # a path: _read_yaml names it if it is missing
    for stem in (str(name), f"pretrain_{name}"):
        if (BUNDLED_CONFIGS / f"{stem}.yaml").is_file():
            return BUNDLED_CONFIGS / f"{stem}.yaml"
    raise ConfigError(f"config {str(name)!r} is neither a file nor a bundled config; bundled: "
                      f"{', '.join(bundled_config_names())}, or pass a YAML path")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a run config (a path or a bundled name), expand `model: NAME`, then apply
    `section.key=value` overrides."""
    path = resolve_config(path)
    data = _read_yaml(path)
    cfg = Config()
    model = data.get("model")
    if isinstance(model, str):
        data = dict(data)
        data.pop("model")
        merge_into(cfg, {"model": _model_preset(path.parent, model)}, f"model preset {model!r}")
    elif isinstance(model, dict) and "preset" in model:
        model = dict(model)
        preset = model.pop("preset")
        merge_into(cfg, {"model": _model_preset(path.parent, preset)}, f"model preset {preset!r}")
        data = dict(data, model=model)
    merge_into(cfg, data, str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              f"e.g. parallel.tensor_parallel=2")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section == "model" and key == "preset":
            merge_into(cfg, {"model": _model_preset(path.parent, raw)}, f"model preset {raw!r}")
            continue
        sections = section_types(Config)
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; "
                              f"known sections: {', '.join(sorted(sections))}")
        apply_override(getattr(cfg, section), key, _parse_override(raw), dotted)
    return cfg


def model_keys_given(path: str | Path, overrides: list[str] = ()) -> set[str]:
    """The model.* keys a run config and its overrides set themselves (a preset's keys
    included). With `checkpoint.load_from=hf:DIR` the checkpoint defines the architecture, and
    only these may disagree with it (hf/importer.py adopt_architecture)."""
    path = resolve_config(path)
    keys: set[str] = set()

    def preset(name: str) -> None:
        keys.update(key for key in _model_preset(path.parent, name) if key != "name")

    model = _read_yaml(path).get("model")
    if isinstance(model, str):
        preset(model)
    elif isinstance(model, dict):
        model = dict(model)
        if "preset" in model:
            preset(model.pop("preset"))
        keys.update(model)
    for item in overrides:
        dotted, _, raw = item.partition("=")
        section, _, key = dotted.partition(".")
        if section == "model":
            preset(raw) if key == "preset" else keys.add(key)
    return keys


def _parse_override(raw: str) -> Any:
    """A command-line value as YAML (numbers, booleans, lists, mappings), else the text."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def coerce_override(dotted: str, value: Any, where: str) -> Any:
    """The value `section.key=value` would set, checked as an override would be; errors name
    `where` (e.g. the command-line flag that stands for the key)."""
    if isinstance(value, str):
        value = _parse_override(value)
    section, _, key = dotted.partition(".")
    if section not in section_types(Config):
        raise ConfigError(f"{where}: unknown section {section!r}")
    target = getattr(Config(), section)
    apply_override(target, key, value, where)
    for part in key.split("."):
        target = target[part] if isinstance(target, dict) else getattr(target, part)
    return target


def _model_preset(config_dir: Path, name: str) -> dict:
    for candidate in (config_dir / "model" / f"{name}.yaml",
                      config_dir.parent / "model" / f"{name}.yaml",
                      BUNDLED_CONFIGS / "model" / f"{name}.yaml"):
        if candidate.is_file():
            data = _read_yaml(candidate)
            return dict(data.get("model", data), name=name)
    available = sorted(p.stem for p in (config_dir / "model").glob("*.yaml"))
    raise ConfigError(f"model preset {name!r} not found in {config_dir / 'model'}; "
                      f"available: {', '.join(available) or 'none'}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

