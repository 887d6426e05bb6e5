"""The loss law L(N, D) = E + A / N^alpha + B / D^beta: published constants, Chinchilla's
approach-3 fit (Huber on log loss, L-BFGS from a grid) with bootstrap intervals, optima.

N counts the parameters that take part in matrix multiplies (what 6N in
pretrain.model.estimate.flops_per_token counts), D the training tokens, C = 6 N D.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def problem(self) -> str | None:
        """What makes this law unusable for planning (None: nothing). A fit on too few or
        too noisy runs can land on a negative or non-finite constant; planning with it gives
        a model of any size at all, so it is refused instead."""
        values = {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}
        bad = [f"{k}={v:g}" for k, v in values.items() if not math.isfinite(v)
               or v < 0 or (k != "E" and v == 0)]
        if bad:
            return (f"{', '.join(bad)}: every constant must be finite, E >= 0 and A, B, alpha, "
                    f"beta > 0")
        return None

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params ** self.alpha + self.B / tokens ** self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimizing the loss at C = 6 N D (Hoffmann et al. 2022, eq. 4)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        params = g * (flops / 6.0) ** (b / (a + b))
        return params, flops / (6.0 * params)

    def tokens_for(self, params: float) -> float:
        """Compute-optimal tokens for a fixed model size (the inverse of `optimal`)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return (params / g) ** ((a + b) / b) / params

    def params_for(self, tokens: float) -> float:
        """Compute-optimal model size for a fixed token count."""
        lo, hi = 1.0, 1e16  # tokens_for grows with params: bisect in log space
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.tokens_for(mid) < tokens else (lo, mid)
        return math.sqrt(lo * hi)


PUBLISHED = {
    # Besiroglu, Erdil, Barnett, You (2024), "Chinchilla Scaling: A replication attempt",
    # table 1: refit of Chinchilla's own data; it agrees with the paper's approaches 1 and 2
    # (~20 tokens per parameter), so it is the default.
    "besiroglu2024": ScalingLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                                "Besiroglu et al. 2024, Chinchilla replication, table 1"),
    # Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", approach 3
    # (section 3.3, eq. 10). Its optimum at Gopher's budget is ~33B, not the 67-70B of the
    # paper's approaches 1-2, the inconsistency the replication traced to the fit.
    "chinchilla": ScalingLaw(1.69, 406.4, 410.7, 0.34, 0.28,
                             "Hoffmann et al. 2022, Chinchilla, approach 3 (eq. 10)"),
}
DEFAULT_LAW = "besiroglu2024"

HUBER_DELTA = 1e-3  # Chinchilla's delta on log loss
# Chinchilla's initialisation grid (approach 3): every point is scored, L-BFGS starts from
# the best few (starting from all 4500 gives the same optimum here, 100x slower).
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
        "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0),
        "b": np.arange(0.0, 25.1, 5.0)}
STARTS = 4


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """Sum of Huber(log L_hat - log L) and its gradient in theta = (a, b, e, alpha, beta),
    where log L_hat = logsumexp(a - alpha log N, b - beta log D, e)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    # logsumexp and its softmax gradient by hand: scipy.special's are ~10x slower at this size
    top = terms.max(axis=0)
    exps = np.exp(terms - top)
    total = exps.sum(axis=0)
    residual = top + np.log(total) - log_loss
    huber = np.where(np.abs(residual) <= HUBER_DELTA, 0.5 * residual ** 2,
                     HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) * exps / total
    grad = np.array([slope[0].sum(), slope[1].sum(), slope[2].sum(),
                     -(slope[0] * log_n).sum(), -(slope[1] * log_d).sum()])
    # Scaled by 1/delta^2 so L-BFGS's default tolerances apply (the raw sum is ~1e-5).
    scale = 1.0 / HUBER_DELTA ** 2
    return huber.sum() * scale, grad * scale


def _grid_objective(log_n, log_d, log_loss) -> list[np.ndarray]:
    """Every grid point's objective; the STARTS best points."""
    points = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"],
                                             GRID["beta"])))  # (P, 5)
    a, b, e, alpha, beta = (points[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d,
                      np.repeat(e, log_n.size, axis=1)])  # (3, P, runs)
    residual = np.abs(logsumexp(terms, axis=0) - log_loss)
    huber = np.where(residual <= HUBER_DELTA, 0.5 * residual ** 2,
                     HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).sum(axis=1)
    return [points[i] for i in np.argsort(huber)[:STARTS]]


def fit_law(params, tokens, losses, source: str = "fitted") -> ScalingLaw:
    """Chinchilla approach 3 on (N, D, final loss) triples."""
    log_n, log_d = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float))
    log_loss = np.log(np.asarray(losses, float))
    best = None
    for start in _grid_objective(log_n, log_d, log_loss):
        # alpha, beta >= 0: a loss that grows with size or data is not a scaling law
        result = minimize(_objective, start, args=(log_n, log_d, log_loss), jac=True,
                          method="L-BFGS-B", bounds=[(None, None)] * 3 + [(0.0, None)] * 2)
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ScalingLaw(math.exp(e), math.exp(a), math.exp(b), alpha, beta, source)


def bootstrap(params, tokens, losses, samples: int = 200, seed: int = 0,
              level: float = 0.8) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each constant over `samples` fits to runs resampled with
    replacement (resamples with fewer than 3 distinct runs are drawn again); NaN when fewer
    than 2 fits could be made."""
    rng = np.random.default_rng(seed)
    params, tokens, losses = (np.asarray(x, float) for x in (params, tokens, losses))
    fits = []
    for _ in range(20 * samples):
        if len(fits) == samples:
            break
        pick = rng.integers(0, len(losses), len(losses))
        if len(set(zip(params[pick], tokens[pick]))) < 3:
            continue  # too few distinct runs to constrain the law
        fits.append(fit_law(params[pick], tokens[pick], losses[pick]))
    tail = (1.0 - level) / 2 * 100
    out = {}
    for name in ("E", "A", "B", "alpha", "beta"):
        values = np.array([getattr(f, name) for f in fits])
        out[name] = ((float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
                     if len(values) >= 2 else (math.nan, math.nan))
    return out
