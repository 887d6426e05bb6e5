"""The recipe (data_tools/curate_lib/recipe.py): stages by name with parameters, defaults filled
in, and every kind of mistake refused with one line naming the stage, parameter and value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.curate_lib.errors import CurateError
from data_tools.curate_lib.recipe import describe, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]


def parse(stages, base=Path(".")):
    return parse_recipe({"stages": stages}, base, "--recipe r.yaml")


def test_defaults_are_filled_in_and_described():
    stages = parse([{"exact_dedup": {}}, {"near_dedup": {"threshold": 0.7}}, "gopher_quality"])
    assert [s.name for s in stages] == ["exact_dedup", "near_dedup", "gopher_quality"]
    assert stages[1].params["threshold"] == 0.7 and stages[1].params["num_perm"] == 128
    assert stages[2].params["min_words"] == 50
    described = describe(stages)
    assert described[1]["near_dedup"]["ngram"] == 5
    assert described[2]["gopher_quality"]["max_symbol_word_ratio"] == 0.1


@pytest.mark.parametrize("stages, message", [
    ([{"fuzzy_dedup": {}}], "stages[0]: unknown stage 'fuzzy_dedup'; stages are exact_dedup, "),
    ([{"near_dedup": {"treshold": 0.8}}], "stages[0].near_dedup: unknown parameter 'treshold'"),
    ([{"near_dedup": {"threshold": 1.5}}], "stages[0].near_dedup.threshold=1.5 must be at least"),
    ([{"near_dedup": {"threshold": "high"}}], "stages[0].near_dedup.threshold='high' must be a number"),
    ([{"near_dedup": {"num_perm": 12.5}}], "stages[0].near_dedup.num_perm=12.5 must be an integer"),
    ([{"near_dedup": {"bands": 4}}], "give both bands and rows"),
    ([{"near_dedup": {"bands": 20, "rows": 10}}], "bands*rows=200 exceeds num_perm=128"),
    ([{"gopher_quality": {"min_words": True}}], "min_words=True must be an integer"),
    ([{"gopher_quality": {"min_words": 10, "max_words": 5}}], "min_words=10 exceeds max_words=5"),
    ([{"gopher_repetition": {"max_top_ngram_char_fraction": {2: 2}}}], "must map n"),
    ([{"language": {"languages": ["english"]}}], "ISO 639-1 codes"),
    ([{"language": {"languages": ["xx"]}}], "py3langid does not know xx"),
    ([{"decontaminate": {}}], "stages[0].decontaminate.files is required"),
    ([{"decontaminate": {"files": ["missing.jsonl"]}}], "missing.jsonl is not a file"),
    ([{"exact_dedup": {}, "near_dedup": {}}], "must be one stage name with its parameters"),
    ([{"exact_dedup": [1]}], "must be a mapping of parameters"),
    ([], "stages must be a non-empty list"),
])
def test_bad_recipes_are_one_line_naming_the_field(stages, message):
    with pytest.raises(CurateError) as err:
        parse(stages)
    text = str(err.value)
    assert text.startswith("--recipe r.yaml: ") and message in text and "\n" not in text


def test_relative_files_are_taken_from_the_recipe_directory(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "r.yaml").write_text("stages:\n  - decontaminate: {files: [eval.jsonl]}\n")
    stage, = load_recipe(str(tmp_path / "r.yaml"))
    assert stage.params["files"] == [str((tmp_path / "eval.jsonl").resolve())]


def test_top_level_shape_and_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [exact_dedup: {}\n")
    with pytest.raises(CurateError, match="not valid YAML"):
        load_recipe(str(bad))
    bad.write_text("steps: []\n")
    with pytest.raises(CurateError, match="expected one key `stages:`.*found \\['steps'\\]"):
        load_recipe(str(bad))
    with pytest.raises(CurateError, match="no such file"):
        load_recipe(str(tmp_path / "none.yaml"))


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    """Checked before Ray starts: a second-long subprocess, no traceback."""
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "r.yaml").write_text("stages:\n  - near_dedup: {threshold: 2}\n")
    proc = subprocess.run([sys.executable, str(REPO / "data_tools" / "curate.py"), "--input",
                           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"),
                           "--recipe", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --recipe ") \
        and "stages[0].near_dedup.threshold=2" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused recipe
