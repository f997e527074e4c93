"""Win rate of one model over another by reward-model score, with a paired bootstrap 95% interval. Pure numpy.

    pytest tests/test_eval.py -k winrate

Both models answer the same prompts; prompt i is a win for A when score_a[i] > score_b[i], a tie (half a win) when
they are equal, a loss otherwise. The interval resamples prompts (pairs stay together) with replacement `iters`
times from a seeded generator and takes the 2.5th and 97.5th percentiles of the resampled win rates.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float]) -> np.ndarray:
    """Per-prompt result for A: 1.0 win, 0.5 tie, 0.0 loss. Shape (n,)."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores must be two 1-D sequences of the same length, got shapes {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def bootstrap_ci(values: np.ndarray, iters: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (shape (n,)), resampling entries with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or iters <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(iters, values.size))  # (iters, n): one resampled prompt set per row
    means = values[idx].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{"win_rate", "ci95": [lo, hi], "n", "wins", "ties", "losses"} of A over B on paired scores."""
    o = outcomes(scores_a, scores_b)
    lo, hi = bootstrap_ci(o, iters=iters, seed=seed)
    return {"win_rate": float(o.mean()) if o.size else float("nan"), "ci95": [lo, hi], "n": int(o.size),
            "wins": int((o == 1.0).sum()), "ties": int((o == 0.5).sum()), "losses": int((o == 0.0).sum())}
