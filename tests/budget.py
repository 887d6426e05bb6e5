"""Time budget per test area: sums each test's setup + call + teardown per area and prints
the table against the budgets of docs/testing.md, plus the check lane's deselection line.

The areas and budgets are read from the table in docs/testing.md itself, so the document and
the report cannot drift apart. It is a report, never a failure: the machines are shared and
noisy, so a test that failed on time would fail on load rather than on code.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "testing.md"
AREA_HEADING = "## Areas and budgets"
OTHER = "other"
# Markers that take a test out of the check lane (docs/testing.md, "Markers").
LANE_MARKERS = ("slow", "multiprocess", "slurm", "install", "gpu")


@dataclass(frozen=True)
class Area:
    name: str
    prefixes: tuple[str, ...]  # repository-relative path prefixes, e.g. "tests/checkpoint/"
    budget_s: float


def read_areas(text: str) -> list[Area]:
    """The rows of the first table under AREA_HEADING: | area | paths | budget (s) | ... |,
    paths as backticked prefixes. Raises ValueError naming what is missing or malformed."""
    if AREA_HEADING not in text:
        raise ValueError(f"docs/testing.md has no '{AREA_HEADING}' section")
    section = text.split(AREA_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"no table under '{AREA_HEADING}' in docs/testing.md")
    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    try:
        name_col, paths_col, budget_col = (header.index(h) for h in ("area", "paths",
                                                                     "budget (s)"))
    except ValueError:
        raise ValueError(f"the table under '{AREA_HEADING}' needs the columns 'area', "
                         f"'paths' and 'budget (s)'; it has {header}") from None
    areas = []
    for row in rows[2:]:  # rows[1] is the |---| separator
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        name = cells[name_col].strip("`*")
        prefixes = tuple(part.strip().strip("`") for part in cells[paths_col].split(",")
                         if part.strip())
        try:
            budget = float(cells[budget_col])
        except ValueError:
            raise ValueError(f"area {name!r}: budget {cells[budget_col]!r} is not a number of "
                             f"seconds") from None
        if not prefixes:
            raise ValueError(f"area {name!r} has no paths")
        areas.append(Area(name, prefixes, budget))
    names = [area.name for area in areas]
    if len(set(names)) != len(names) or OTHER in names:
        raise ValueError(f"area names must be unique and not {OTHER!r}: {names}")
    return areas


def load_areas(doc: Path = DOC) -> list[Area]:
    return read_areas(doc.read_text(encoding="utf-8"))


def area_of(path: str, areas: list[Area]) -> str:
    """The area whose prefix matches `path` (repository-relative, '/'-separated) longest, so
    that tests/hf/families/ can be its own area inside tests/hf/; OTHER when none does."""
    best, best_len = OTHER, -1
    for area in areas:
        for prefix in area.prefixes:
            if path.startswith(prefix) and len(prefix) > best_len:
                best, best_len = area.name, len(prefix)
    return best


def render(areas: list[Area], seconds: dict[str, float], tests: dict[str, int],
           wall_s: float, unmapped: list[str]) -> list[str]:
    """The report's lines: one row per area that has a budget or ran tests, then the total."""
    name_width = max([len(OTHER), *(len(area.name) for area in areas)])
    lines = [f"{'area':<{name_width}}  {'tests':>5}  {'seconds':>8}  {'budget':>7}  verdict"]
    rows = [(area.name, area.budget_s) for area in areas]
    if tests.get(OTHER):
        rows.append((OTHER, 0.0))
    for name, budget in rows:
        spent, count = seconds.get(name, 0.0), tests.get(name, 0)
        if count == 0:
            verdict = "not run"
        elif name == OTHER:
            verdict = "NO AREA: add a row to docs/testing.md"
        else:
            verdict = f"OVER by {spent - budget:.0f} s" if spent > budget else "ok"
        lines.append(f"{name:<{name_width}}  {count:>5}  {spent:>8.1f}  {budget:>7.0f}  "
                     f"{verdict}")
    total_budget = sum(area.budget_s for area in areas)
    total_tests, total_s = sum(tests.values()), sum(seconds.values())
    lines.append(f"{'total':<{name_width}}  {total_tests:>5}  {total_s:>8.1f}  "
                 f"{total_budget:>7.0f}  {'OVER' if total_s > total_budget else 'ok'}")
    lines.append(f"wall time {wall_s:.0f} s ({wall_s / 60:.1f} min), collection included")
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:5]) + (" ..." if len(unmapped) > 5 else "")
        lines.append(f"{len(unmapped)} test file(s) under no area ('{OTHER}'): {shown}")
    return lines


class Tally:
    """Seconds and tests per area; a test's setup, call and teardown all count."""

    def __init__(self, areas: list[Area]):
        self.areas = areas
        self.seconds: dict[str, float] = defaultdict(float)
        self.nodeids: dict[str, set[str]] = defaultdict(set)
        self.unmapped: set[str] = set()

    def add(self, nodeid: str, duration_s: float) -> None:
        path = nodeid.split("::", 1)[0]
        area = area_of(path, self.areas)
        if area == OTHER:
            self.unmapped.add(path)
        self.seconds[area] += duration_s
        self.nodeids[area].add(nodeid)

    def lines(self, wall_s: float) -> list[str]:
        tests = {area: len(ids) for area, ids in self.nodeids.items()}
        return render(self.areas, self.seconds, tests, wall_s, sorted(self.unmapped))


class BudgetPlugin:
    """Prints the budget table (with --budget-report) and, whenever tests were deselected,
    how many, by which marker, and that `make test` runs them."""

    def __init__(self, config):
        self.config = config
        self.started = time.monotonic()
        self.deselected: Counter[str] = Counter()
        # A broken table must not stop the tests it reports on: the error is printed instead
        # (and tests/test_budget.py fails on it).
        try:
            self.tally, self.error = Tally(load_areas()), ""
        except (OSError, ValueError) as error:
            self.tally, self.error = Tally([]), str(error)

    def pytest_deselected(self, items):
        for item in items:
            markers = [m for m in LANE_MARKERS if item.get_closest_marker(m)] or ["unmarked"]
            self.deselected[markers[0]] += 1

    def pytest_runtest_logreport(self, report):
        self.tally.add(report.nodeid, report.duration)

    @pytest.hookimpl(trylast=True)  # after --durations' list
    def pytest_terminal_summary(self, terminalreporter):
        if not self.config.getoption("budget_report"):
            return
        terminalreporter.section("time per area against docs/testing.md")
        if self.error:
            terminalreporter.write_line(f"no budget report: {self.error}", red=True)
            return
        for line in self.tally.lines(time.monotonic() - self.started):
            terminalreporter.write_line(line)

    def pytest_unconfigure(self, config):
        # Here rather than in the summary so that it is the very last line, under pytest's
        # own "N passed, M deselected".
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        if not self.deselected or terminal is None:
            return
        by_marker = ", ".join(f"{count} {marker}" for marker, count in
                              self.deselected.most_common())
        expression = config.getoption("markexpr") or config.getoption("keyword")
        terminal.write_line(f"{sum(self.deselected.values())} tests deselected by "
                            f"'{expression}' ({by_marker}); `make test` runs them",
                            yellow=True, bold=True)


def pytest_addoption(parser):
    parser.addoption("--budget-report", action="store_true", dest="budget_report",
                     help="print each test area's time against its budget in docs/testing.md")


def pytest_configure(config):
    config.pluginmanager.register(BudgetPlugin(config), "budget-report")
