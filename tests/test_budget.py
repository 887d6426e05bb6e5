"""The budget report (tests/budget.py): its table is docs/testing.md's, every test file has an
area, and the report flags what is over budget or under no area."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import budget

REPO = Path(__file__).resolve().parents[1]


def test_doc_table_parses_and_stays_within_the_ci_target():
    areas = budget.load_areas()
    names = [area.name for area in areas]
    for expected in ("checkpoint", "data", "hf", "parity", "slurm", "golden", "reliability"):
        assert expected in names
    # The CI target for the whole suite, future areas included (docs/testing.md).
    assert sum(area.budget_s for area in areas) <= 1200
    assert all(area.budget_s > 0 and area.prefixes for area in areas)


def test_every_test_file_has_an_area():
    areas = budget.load_areas()
    files = [path.relative_to(REPO).as_posix() for path in (REPO / "tests").rglob("test_*.py")]
    assert len(files) > 40
    assert [path for path in files if budget.area_of(path, areas) == budget.OTHER] == []


def test_longest_prefix_wins_and_an_uncovered_path_is_other():
    areas = budget.load_areas()
    assert budget.area_of("tests/hf/test_export_hf.py", areas) == "hf"
    assert budget.area_of("tests/hf/families/test_qwen.py", areas) == "hf_families"
    assert budget.area_of("tests/test_config_bad_input.py", areas) == "config"
    assert budget.area_of("tests/test_nowhere.py", areas) == budget.OTHER


@pytest.mark.parametrize("table, message", [
    ("| area | paths |\n| --- | --- |\n| x | `tests/x/` |\n", "budget (s)"),
    ("| area | paths | budget (s) |\n| --- | --- | --- |\n| x | `tests/x/` | soon |\n",
     "not a number"),
    ("| area | paths | budget (s) |\n| --- | --- | --- |\n| x | | 5 |\n", "has no paths"),
    ("| area | paths | budget (s) |\n| --- | --- | --- |\n| x | `a` | 5 |\n| x | `b` | 5 |\n",
     "unique"),
])
def test_malformed_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        budget.read_areas(f"# Testing\n\n{budget.AREA_HEADING}\n\n{table}\n## Next\n")


def test_report_flags_over_budget_and_unmapped_files():
    areas = budget.read_areas(f"{budget.AREA_HEADING}\n\n| area | paths | budget (s) |\n"
                              "| --- | --- | --- |\n| fast | `tests/fast/` | 10 |\n"
                              "| heavy | `tests/heavy/` | 20 |\n| future | `tests/later/` | 5 |\n")
    tally = budget.Tally(areas)
    for when_s in (0.5, 3.0, 0.1):  # setup, call, teardown of one test
        tally.add("tests/fast/test_a.py::test_one", when_s)
    tally.add("tests/heavy/test_b.py::test_two[1]", 25.0)
    tally.add("tests/stray/test_c.py::test_three", 1.0)
    lines = tally.lines(wall_s=40.0)
    rows = {line.split()[0]: line for line in lines}

    assert rows["fast"].split()[1:4] == ["1", "3.6", "10"] and rows["fast"].endswith("ok")
    assert "OVER by 5 s" in rows["heavy"]
    assert "not run" in rows["future"]
    assert "NO AREA" in rows["other"]
    assert rows["total"].split()[1:4] == ["3", "29.6", "35"]
    assert any("1 test file(s) under no area" in line and "tests/stray/test_c.py" in line
               for line in lines)
    assert any(line.startswith("wall time 40 s") for line in lines)
