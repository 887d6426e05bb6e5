"""Values checked against the config tree's field types, and the one way a key of a section
is set (`apply_override`) that YAML files, command-line overrides and saved configs all use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pretrain.config.schema import Config
from pretrain.errors import ConfigError


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's annotation; YAML-parse strings from the command line."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        # YAML 1.1 reads on/off (and yes/no) as booleans.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be an integer")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept anything float() parses.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(number):  # .nan / .inf: every comparison with them is False
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r} must be a string")
    if annotation is list:
        return _coerce_blend(value, where)
    if annotation is dict:
        return _coerce_mapping(value, where)
    if annotation == list[dict]:
        return _coerce_stages(value, where)
    if annotation == list[str]:  # a YAML list, or "core_attn,mlp" from the command line
        items = value if isinstance(value, list) else str(value).split(",")
        if not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{where}={value!r} must be a list of names, e.g. [core_attn, mlp]")
        return [item.strip() for item in items if item.strip()]
    if annotation == list[int]:  # a YAML list, one number, or "0,8" from the command line
        items = value if isinstance(value, list) else str(value).split(",")
        try:
            numbers = [int(str(item).strip()) for item in items]
        except ValueError:
            raise ConfigError(f"{where}={value!r} must be a list of integers, e.g. [0, 8] or "
                              f"0,8") from None
        return numbers
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(annotation))}")
        obj = annotation()
        for key, item in value.items():
            apply_override(obj, str(key), item, f"{where}.{key}")
        return obj
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r} has the wrong type ({annotation})")
    raise TypeError(f"unsupported annotation {annotation} for {where}")


def _coerce_blend(value: Any, where: str) -> list[dict]:
    """A path, a list of paths, or a list of {path, weight} -> [{path, weight}, ...]."""
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item, "weight": 1.0}
        if not isinstance(item, dict) or set(item) - {"path", "weight"} or "path" not in item:
            raise ConfigError(f"{where}: {item!r} is not a path or a {{path: ..., weight: ...}} "
                              f"mapping, e.g. {where}=[{{path: data/web, weight: 0.7}}]")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}: weight {weight!r} of {item['path']!r} must be a "
                              f"positive finite number")
        out.append({"path": str(item["path"]), "weight": float(weight)})
    return out


def _coerce_mapping(value: Any, where: str) -> dict:
    """A free-form mapping (the DeepSpeed passthrough), or a path to a JSON file holding one."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise ConfigError(f"{where}={value}: key {dup!r} appears twice; keep one")
            return dict(pairs)

        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{where}={value!r} is neither a mapping nor an existing JSON "
                              f"file; give {{key: value, ...}} or the path of a DeepSpeed JSON")
        try:
            value = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{where}={path}: not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}={value!r} must be a mapping (or a JSON file path)")
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursing into mappings both have; neither input is modified."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = deep_merge(out[key], value)
        out[key] = value
    return out


def _coerce_stages(value: Any, where: str) -> list[dict]:
    """[{at_step: S, train: BLEND}, ...] with each blend in any form data.train accepts."""
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        value = [value]
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"at_step", "train"}:
            raise ConfigError(f"{where}[{i}]={item!r} must be a mapping of at_step and train, "
                              f"e.g. {where}=[{{at_step: 900, train: data/anneal}}]")
        step = item["at_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{where}[{i}].at_step={step!r} must be a step number >= 1")
        blend = _coerce_blend(item["train"], f"{where}[{i}].train")
        if not blend:
            raise ConfigError(f"{where}[{i}].train is empty; name the blend to switch to")
        out.append({"at_step": step, "train": blend})
    return out


def section_types(cls) -> dict[str, Any]:
    """{field name: its type} of a config dataclass (annotations resolved)."""
    return typing.get_type_hints(cls)


def apply_override(section_obj: Any, key: str, value: Any, where: str) -> None:
    """Set `key` (dotted into nested sections and mappings) of one section to `value`,
    checked against the field's type; errors name `where` (e.g. `parallel.zero_stage`)."""
    hints = section_types(type(section_obj))
    head, dot, rest = key.partition(".")
    if dot and head in hints and dataclasses.is_dataclass(hints[head]):
        # A dotted key into a nested section (logging.wandb.mode=offline) sets one field.
        apply_override(getattr(section_obj, head), rest, value, where)
        return
    if dot and hints.get(head) is dict:
        # A dotted key into a mapping (parallel.deepspeed.zero_optimization.overlap_comm=true)
        # sets one leaf, creating the levels above it.
        for part in reversed(rest.split(".")):
            value = {part: value}
        key = head
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown key {where!r}; known keys of this section: {known}")
    value = _coerce(value, hints[key], where)
    if hints[key] is dict:  # later sources merge into a mapping rather than replace it
        value = deep_merge(getattr(section_obj, key), value)
    setattr(section_obj, key, value)


def merge_into(cfg: Config, data: dict, source: str) -> None:
    """Apply a {section: {key: value}} mapping (a YAML file, a saved config) onto `cfg`;
    errors about a section name `source`."""
    sections = section_types(Config)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; "
                              f"known sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            apply_override(getattr(cfg, section), key, value, f"{section}.{key}")

