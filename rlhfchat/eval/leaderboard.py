"""Arena ratings: Bradley-Terry strengths on the Elo scale, with bootstrap intervals (the method of FastChat's
Chatbot Arena leaderboard).

    battles = [("ppo", "sft", "a"), ("ppo", "sft", "tie"), ("sft", "ppo", "b"), ...]  # (model A, model B, winner)
    rows = leaderboard(battles, bootstrap=1000, seed=0)
    rows[0].model, rows[0].rating, rows[0].lower, rows[0].upper

The Bradley-Terry model says P(i beats j) = p_i / (p_i + p_j). Its maximum-likelihood strengths solve the score
equations W_i = sum_j n_ij p_i / (p_i + p_j) (found by Newton's method on log p), where n_ij counts the battles of i
and j and W_i is i's wins, a tie (or "both bad", as FastChat counts it) being half a win for each side. A rating is
init + scale * log_base(p_i): with FastChat's scale 400, base 10 and init 1000, a 100-point gap is a 64% chance of
winning. Ratings are centred so that their mean is `init`.

A model that never won (or never lost) has no finite maximum-likelihood strength. `prior` adds that many virtual
ties of every model against a virtual player of average strength (strength 1), which keeps every rating finite and
pulls ratings with little evidence towards the mean; prior=0 gives the plain maximum-likelihood fit.

The interval of each rating comes from `bootstrap` refits on battles resampled with replacement (the 2.5th and
97.5th percentiles for 95%), as FastChat computes its confidence intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rlhfchat.errors import RlhfchatError

WINNERS = ("a", "b", "tie", "both_bad")
Battle = tuple[str, str, str]


@dataclass
class Rating:
    model: str
    rating: float
    lower: float  # the bootstrap interval (equal to rating when bootstrap is 0)
    upper: float
    battles: int
    wins: int
    losses: int
    ties: int  # ties and "both bad"


def _encode(battles: Sequence[Battle]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Battles -> (model names, index of A (n,), index of B (n,), A's share of the win (n,): 1, 0 or 0.5)."""
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(names)}
    a_idx, b_idx, score = [], [], []
    for k, (a, b, winner) in enumerate(battles):
        if winner not in WINNERS:
            raise RlhfchatError(f"battle {k}: winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        if a == b:
            raise RlhfchatError(f"battle {k}: a model cannot battle itself ({a!r})")
        a_idx.append(index[a])
        b_idx.append(index[b])
        score.append(1.0 if winner == "a" else 0.0 if winner == "b" else 0.5)
    return names, np.array(a_idx, dtype=np.int64), np.array(b_idx, dtype=np.int64), np.array(score)


def _fit(n_models: int, a: np.ndarray, b: np.ndarray, score: np.ndarray, prior: float,
         iterations: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths (n_models,), mean 0, of the Bradley-Terry fit with `prior` virtual ties.

    Newton's method on the log-likelihood, which is concave in the log-strengths: a few iterations, where the MM
    iteration takes thousands when one model wins nearly everything. Steps are capped at 4 (a factor e^4 in
    strength) so that a far start cannot overshoot.
    """
    wins = np.bincount(a, weights=score, minlength=n_models) + np.bincount(b, weights=1.0 - score,
                                                                             minlength=n_models)
    wins = wins + 0.5 * prior
    games = np.zeros((n_models, n_models))
    np.add.at(games, (a, b), 1.0)
    games = games + games.T
    theta = np.zeros(n_models)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        q = 1.0 / (1.0 + np.exp(-theta))  # P(i beats the virtual player)
        grad = wins - (games * p).sum(axis=1) - prior * q
        w = games * p * p.T
        hess = w - np.diag(w.sum(axis=1) + prior * q * (1.0 - q))
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # prior 0: singular along the common shift
        step = np.clip(step, -4.0, 4.0)
        theta = theta - step
        if prior == 0:
            theta = theta - theta.mean()
        if float(np.abs(step).max()) < tol:
            break
    return theta - theta.mean()


def ratings(battles: Sequence[Battle], prior: float = 1.0, scale: float = 400.0, base: float = 10.0,
            init: float = 1000.0) -> dict[str, float]:
    """The Bradley-Terry rating of every model in `battles` (see the module docstring)."""
    if not battles:
        return {}
    names, a, b, score = _encode(battles)
    log_p = _fit(len(names), a, b, score, prior)
    return {m: init + scale * float(x) / math.log(base) for m, x in zip(names, log_p)}


def leaderboard(battles: Sequence[Battle], bootstrap: int = 1000, seed: int = 0, prior: float = 1.0,
                scale: float = 400.0, base: float = 10.0, init: float = 1000.0, level: float = 0.95) -> list[Rating]:
    """Every model's rating, its bootstrap interval and its counts, best first."""
    if not battles:
        return []
    names, a, b, score = _encode(battles)
    to_elo = scale / math.log(base)
    point = init + to_elo * _fit(len(names), a, b, score, prior)
    lower, upper = point.copy(), point.copy()
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = np.empty((bootstrap, len(names)))
        for k in range(bootstrap):
            pick = rng.integers(0, len(score), len(score))
            samples[k] = init + to_elo * _fit(len(names), a[pick], b[pick], score[pick], prior)
        tail = (1.0 - level) / 2 * 100
        lower, upper = np.percentile(samples, [tail, 100 - tail], axis=0)
    rows = []
    for i, name in enumerate(names):
        as_a, as_b = a == i, b == i
        wins = int((score[as_a] == 1.0).sum() + (score[as_b] == 0.0).sum())
        losses = int((score[as_a] == 0.0).sum() + (score[as_b] == 1.0).sum())
        ties = int((score[as_a | as_b] == 0.5).sum())
        rows.append(Rating(name, float(point[i]), float(lower[i]), float(upper[i]), wins + losses + ties, wins,
                           losses, ties))
    return sorted(rows, key=lambda r: -r.rating)


def win_probability(rating_a: float, rating_b: float, scale: float = 400.0, base: float = 10.0) -> float:
    """P(A beats B) under the ratings: 1 / (1 + base^((rating_b - rating_a) / scale))."""
    return 1.0 / (1.0 + base ** ((rating_b - rating_a) / scale))
