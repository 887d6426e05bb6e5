"""Golden losses: the per-step losses of two fixed 20-step runs (tests/golden/runs.py) against
the values checked into tests/golden/losses.json.

The layout-parity suite compares layouts with each other, so a change that moves every layout
alike (an initializer, a norm's epsilon, RoPE's base, the optimizer's maths) passes it; this
test catches that. It runs only under the torch minor version the file was made with (the
Makefile's pin): CPU kernels differ between releases. To change the numerics on purpose,
regenerate with `python -m tests.golden.regenerate --reason "..."` and give the reason in the
commit message.

Tolerance, from measurement (the largest |loss - golden| over the 20 steps; torch 2.13.0 on
this 2-core x86 machine with avx512, 2026-12-02, `python -m tests.golden.regenerate --measure`):
- kernel paths and threads: ATEN_CPU_CAPABILITY=default 2.4e-7, avx2 2.4e-7, avx512 0,
  OMP_NUM_THREADS=2 0; TP2xPP2 with ATEN_CPU_CAPABILITY=default 2.4e-7, with 2 threads 0;
- one-knob model changes: init_std 0.02 -> 0.021 1.7e-2, norm_eps 1e-5 -> 1e-6 2.7e-3,
  rotary_base 10000 -> 20000 2.5e-4;
so the tolerance, 1e-5 (losses.json "tolerance"; the figures are in its "measured"), is
25x below the smallest change and 40x above every kernel/thread spread measured.
"""

from __future__ import annotations

import pytest
import torch

from tests.golden import runs

pytestmark = pytest.mark.multiprocess

GOLDEN = runs.read_golden()
TOLERANCE = GOLDEN["tolerance"]


def first_difference(losses: list[float], golden: list[float]) -> str | None:
    for step, (got, want) in enumerate(zip(losses, golden), start=1):
        if abs(got - want) > TOLERANCE:
            return (f"step {step}: loss {got!r}, golden {want!r} (|diff| {abs(got - want):.3e} "
                    f"> {TOLERANCE:.1e})")
    return None


@pytest.mark.skipif(torch.__version__.split("+")[0].rsplit(".", 1)[0]
                    != GOLDEN["torch"].rsplit(".", 1)[0],
                    reason=f"golden losses were made with torch {GOLDEN['torch']}, this is "
                           f"{torch.__version__}; regenerate with: {runs.REGENERATE}")
@pytest.mark.parametrize("layout", list(runs.LAYOUTS))
def test_losses_match_golden(layout, tmp_path):
    losses = runs.run_layout(tmp_path, layout)
    diff = first_difference(losses, GOLDEN["losses"][layout])
    assert diff is None, f"{layout}: {diff}; if the change is meant, {runs.REGENERATE}"


def test_tolerance_is_below_every_model_change():
    """The recorded effects of three one-knob model changes stay >= 10x the tolerance."""
    changes = GOLDEN["measured"]["model_changes"]
    assert min(changes.values()) >= 10 * TOLERANCE, changes
    assert max(GOLDEN["measured"]["kernel_and_thread_spread"].values()) <= TOLERANCE
