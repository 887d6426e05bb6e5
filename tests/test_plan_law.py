"""The scaling law: published optima against the Chinchilla paper's table, and the
approach-3 fit recovering known constants from noisy losses."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.plan.law import PUBLISHED, ScalingLaw, bootstrap, fit_law

# Hoffmann et al. 2022, table 3 (approaches 1-2): FLOPs -> (parameters, tokens).
CHINCHILLA_TABLE = [(1.92e19, 400e6, 8.0e9), (1.21e20, 1e9, 20.2e9), (1.23e22, 10e9, 205.1e9),
                    (5.76e23, 67e9, 1.5e12), (3.85e24, 175e9, 3.7e12), (1.27e26, 1e12, 21.2e12)]


@pytest.mark.parametrize("flops, params, tokens", CHINCHILLA_TABLE)
def test_replication_optimum_matches_chinchilla_table(flops, params, tokens):
    # The replication's exponents differ from approach 1's by 0.01, which drifts ~15% over
    # seven decades of compute: 20% is the stated tolerance.
    n, d = PUBLISHED["besiroglu2024"].optimal(flops)
    assert n == pytest.approx(params, rel=0.2)
    assert d == pytest.approx(tokens, rel=0.2)
    assert 6 * n * d == pytest.approx(flops, rel=1e-9)


def test_chinchilla_model_and_twenty_tokens_per_parameter():
    law = PUBLISHED["besiroglu2024"]
    n, d = law.optimal(6 * 70e9 * 1.4e12)  # Chinchilla itself: 70B on 1.4T, ~5.9e23 FLOPs
    assert n == pytest.approx(70e9, rel=0.1) and d == pytest.approx(1.4e12, rel=0.1)
    assert 15 < d / n < 25
    assert law.tokens_for(70e9) == pytest.approx(law.optimal(6 * 70e9 * law.tokens_for(70e9))[1])
    assert law.params_for(1.4e12) == pytest.approx(76.3e9, rel=0.01)
    # The paper's approach-3 constants put Gopher's budget at ~33B (the inconsistency
    # Besiroglu et al. report), not 67B: kept, but not the default.
    assert PUBLISHED["chinchilla"].optimal(5.76e23)[0] == pytest.approx(32.4e9, rel=0.05)


def _ladder(law: ScalingLaw, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(2e8, 2e10, 4))
    n, d = n.ravel(), d.ravel()
    loss = np.array([law.loss(a, b) for a, b in zip(n, d)]) * np.exp(rng.normal(0, noise, n.size))
    return n, d, loss


def test_fit_recovers_known_constants():
    true = ScalingLaw(1.8, 480.0, 2000.0, 0.35, 0.37)
    exact = fit_law(*_ladder(true, 0.0))
    for name, rel in (("E", 1e-3), ("A", 1e-2), ("B", 1e-2), ("alpha", 1e-3), ("beta", 1e-3)):
        assert getattr(exact, name) == pytest.approx(getattr(true, name), rel=rel), name
    noisy = fit_law(*_ladder(true, 0.003))  # 0.3% loss noise, as seeds differ
    assert noisy.E == pytest.approx(1.8, rel=0.03)
    assert noisy.alpha == pytest.approx(0.35, abs=0.03)
    assert noisy.beta == pytest.approx(0.37, abs=0.03)
    # what the law is for: the loss of a model 10x past the ladder
    assert noisy.loss(1e10, 2e11) == pytest.approx(true.loss(1e10, 2e11), rel=0.01)


def test_bootstrap_interval_holds_the_truth():
    true = ScalingLaw(1.8, 480.0, 2000.0, 0.35, 0.37)
    intervals = bootstrap(*_ladder(true, 0.003, seed=1), samples=12, seed=0, level=0.9)
    assert intervals["E"][0] < intervals["E"][1]
    for name in ("E", "alpha", "beta"):
        low, high = intervals[name]
        assert low - 0.02 <= getattr(true, name) <= high + 0.02, (name, low, high)
