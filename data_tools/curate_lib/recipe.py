"""The curation recipe: a YAML list of stages, each a name with parameters, checked in full
before any work starts (unknown stage or parameter, bad type or range: one line naming it).

    stages:
      - exact_dedup: {}
      - gopher_quality: {min_words: 50}
      - near_dedup: {threshold: 0.8}

Stages run in the listed order: a document removed by one stage is not seen by the later ones.
The defaults are the published ones; quality.py cites the paper and table of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_tools.curate_lib.errors import CurateError


@dataclass(frozen=True)
class Param:
    default: object
    kind: str  # int, float, bool, str, languages, paths, ngram_map, path_or_none
    lo: float | None = None  # inclusive bounds
    hi: float | None = None
    required: bool = False


REQUIRED = object()

# Gopher (Rae et al. 2021, "Scaling Language Models", Appendix A.1.1 and Table A1).
_GOPHER_QUALITY = {
    "min_words": Param(50, "int", 0),
    "max_words": Param(100_000, "int", 1),
    "min_mean_word_length": Param(3.0, "float", 0),
    "max_mean_word_length": Param(10.0, "float", 0),
    "max_symbol_word_ratio": Param(0.1, "float", 0),
    "max_bullet_lines_ratio": Param(0.9, "float", 0, 1),
    "max_ellipsis_lines_ratio": Param(0.3, "float", 0, 1),
    "min_alpha_words_ratio": Param(0.8, "float", 0, 1),
    "min_stop_words": Param(2, "int", 0),
}
_GOPHER_REPETITION = {
    "max_duplicate_line_fraction": Param(0.30, "float", 0, 1),
    "max_duplicate_paragraph_fraction": Param(0.30, "float", 0, 1),
    "max_duplicate_line_char_fraction": Param(0.20, "float", 0, 1),
    "max_duplicate_paragraph_char_fraction": Param(0.20, "float", 0, 1),
    "max_top_ngram_char_fraction": Param({2: 0.20, 3: 0.18, 4: 0.16}, "ngram_map"),
    "max_duplicate_ngram_char_fraction": Param(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, "ngram_map"),
}
# C4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", Section 2.2).
_C4_QUALITY = {
    "min_words_per_line": Param(5, "int", 0),
    "min_sentences": Param(3, "int", 0),
    "bad_words_file": Param(None, "path_or_none"),
}

STAGES: dict[str, dict[str, Param]] = {
    "exact_dedup": {},
    "near_dedup": {
        "threshold": Param(0.8, "float", 0.01, 1.0),
        "num_perm": Param(128, "int", 2, 4096),
        "ngram": Param(5, "int", 1, 100),
        "bands": Param(None, "int", 1, 4096),  # both or neither of bands and rows
        "rows": Param(None, "int", 1, 4096),
        "seed": Param(1, "int", 0, 2 ** 31 - 1),
    },
    "gopher_quality": _GOPHER_QUALITY,
    "gopher_repetition": _GOPHER_REPETITION,
    "c4_quality": _C4_QUALITY,
    "language": {
        "languages": Param(["en"], "languages"),
        # The score is py3langid's normalized probability of its best language.
        "min_score": Param(0.65, "float", 0, 1),
    },
    # GPT-3 (Brown et al. 2020, Appendix C): 13-gram overlap with the evaluation sets.
    "decontaminate": {
        "files": Param(REQUIRED, "paths", required=True),
        "ngram": Param(13, "int", 1, 100),
        "text_key": Param("text", "str"),
    },
}
DEDUP_STAGES = ("exact_dedup", "near_dedup")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    params: dict

    @property
    def label(self) -> str:
        return f"stages[{self.index}].{self.name}"


def _check_value(where: str, name: str, param: Param, value, base: Path):
    bad = f"{where}.{name}={value!r}"
    kind = param.kind
    if kind == "path_or_none":
        if value is None:
            return None
        kind = "path"
    if value is None and param.default is None:
        return None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise CurateError(f"{bad} must be an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CurateError(f"{bad} must be a number")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise CurateError(f"{bad} must be a non-empty string")
    elif kind == "languages":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v.isalpha() and 2 <= len(v) <= 3 for v in value):
            raise CurateError(f"{bad} must be a non-empty list of ISO 639-1 codes, e.g. [en, de]")
        from data_tools.curate_lib.filters import known_languages

        unknown = sorted(set(value) - known_languages())
        if unknown:
            raise CurateError(f"{bad}: py3langid does not know {', '.join(unknown)}; use its "
                              f"ISO 639-1 codes (en, de, fr, ...)")
        return sorted(set(value))
    elif kind in ("path", "paths"):
        values = [value] if kind == "path" else value
        if not isinstance(values, list) or not values or not all(
                isinstance(v, str) and v for v in values):
            raise CurateError(f"{bad} must be a {'file path' if kind == 'path' else 'list of file paths'}")
        resolved = []
        for v in values:
            path = Path(v) if Path(v).is_absolute() else base / v
            if not path.is_file():
                raise CurateError(f"{where}.{name}: {v} is not a file (relative paths are taken "
                                  f"from the recipe's directory {base})")
            resolved.append(str(path.resolve()))
        return resolved[0] if kind == "path" else resolved
    elif kind == "ngram_map":
        if not isinstance(value, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 100
                and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                for k, v in value.items()):
            raise CurateError(f"{bad} must map n (1-100) to a fraction in [0, 1], e.g. {{2: 0.2}}")
        return {int(k): float(v) for k, v in sorted(value.items())}
    if param.lo is not None and value < param.lo or param.hi is not None and value > param.hi:
        hi = "" if param.hi is None else f" and at most {param.hi:g}"
        raise CurateError(f"{bad} must be at least {param.lo:g}{hi}")
    return value


def _check_stage(index: int, entry, base: Path) -> Stage:
    where = f"stages[{index}]"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise CurateError(f"{where} must be one stage name with its parameters, e.g. "
                          f"`- near_dedup: {{threshold: 0.8}}`")
    (name, given), = entry.items()
    if name not in STAGES:
        raise CurateError(f"{where}: unknown stage {name!r}; stages are {', '.join(STAGES)}")
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise CurateError(f"{where}.{name} must be a mapping of parameters, got {given!r}")
    spec = STAGES[name]
    unknown = sorted(set(map(str, given)) - set(spec))
    if unknown:
        known = ", ".join(spec) or "none"
        raise CurateError(f"{where}.{name}: unknown parameter {unknown[0]!r}; its parameters are "
                          f"{known}")
    params = {}
    for key, param in spec.items():
        if key not in given:
            if param.required:
                raise CurateError(f"{where}.{name}.{key} is required")
            params[key] = param.default
        else:
            params[key] = _check_value(f"{where}.{name}", key, param, given[key], base)
    stage = Stage(index, name, params)
    _cross_checks(stage)
    return stage


def _cross_checks(stage: Stage) -> None:
    p = stage.params
    if stage.name == "near_dedup":
        if (p["bands"] is None) != (p["rows"] is None):
            raise CurateError(f"{stage.label}: give both bands and rows, or neither (then they "
                              f"follow from threshold and num_perm)")
        if p["bands"] is not None and p["bands"] * p["rows"] > p["num_perm"]:
            raise CurateError(f"{stage.label}: bands*rows={p['bands'] * p['rows']} exceeds "
                              f"num_perm={p['num_perm']}; lower them or raise num_perm")
    if stage.name == "gopher_quality":
        if p["min_words"] > p["max_words"]:
            raise CurateError(f"{stage.label}: min_words={p['min_words']} exceeds "
                              f"max_words={p['max_words']}")
        if p["min_mean_word_length"] > p["max_mean_word_length"]:
            raise CurateError(f"{stage.label}: min_mean_word_length exceeds max_mean_word_length")


def parse_recipe(data, base: Path, where: str = "--recipe") -> list[Stage]:
    """The checked stages of a parsed YAML document; relative paths are taken from `base`."""
    if not isinstance(data, dict) or set(data) != {"stages"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CurateError(f"{where}: expected one key `stages:` holding a list of stages, found "
                          f"{found}")
    entries = data["stages"]
    if not isinstance(entries, list) or not entries:
        raise CurateError(f"{where}: stages must be a non-empty list, e.g. "
                          f"`stages: [{{exact_dedup: {{}}}}]`")
    try:
        return [_check_stage(i, entry, base) for i, entry in enumerate(entries)]
    except CurateError as err:
        raise CurateError(f"{where}: {err}") from None


def load_recipe(path: str) -> list[Stage]:
    if not Path(path).is_file():
        raise CurateError(f"--recipe {path}: no such file; pass a YAML file with a `stages:` list")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = " ".join(str(err).split())[:200]
        raise CurateError(f"--recipe {path}: not valid YAML ({first})") from None
    return parse_recipe(data, Path(path).resolve().parent, f"--recipe {path}")


def describe(stages: list[Stage]) -> list[dict]:
    """The recipe with every default filled in (the manifest's record of what ran)."""
    return [{stage.name: {k: (dict((str(n), f) for n, f in v.items()) if isinstance(v, dict) else v)
                          for k, v in stage.params.items()}} for stage in stages]
