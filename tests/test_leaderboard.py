"""Arena ratings (rlhfchat.eval.leaderboard): Bradley-Terry on the Elo scale against hand computations."""

from __future__ import annotations

import math

import pytest

from rlhfchat.errors import RlhfchatError
from rlhfchat.eval.leaderboard import leaderboard, ratings, win_probability


def test_two_models_plain_fit_is_the_log_odds_of_the_win_share():
    # A beats B 3 times of 4: p_A / p_B = 3, so the gap is 400 log10(3) = 190.85 points around a mean of 1000
    battles = [("A", "B", "a")] * 2 + [("B", "A", "b")] + [("A", "B", "b")]
    r = ratings(battles, prior=0)
    gap = 400 * math.log10(3)
    assert r["A"] == pytest.approx(1000 + gap / 2, abs=1e-6)
    assert r["B"] == pytest.approx(1000 - gap / 2, abs=1e-6)
    assert win_probability(r["A"], r["B"]) == pytest.approx(0.75, abs=1e-9)


def test_ties_and_both_bad_are_half_a_win_each():
    # 1 win, 1 loss, 2 ties: even; 2 wins and 2 ties against none: W_A = 3, W_B = 1, ratio 3 again
    assert ratings([("A", "B", "a"), ("A", "B", "b"), ("A", "B", "tie"), ("B", "A", "both_bad")], prior=0) == \
        pytest.approx({"A": 1000.0, "B": 1000.0})
    r = ratings([("A", "B", "a"), ("B", "A", "b"), ("A", "B", "tie"), ("A", "B", "both_bad")], prior=0)
    assert r["A"] - r["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)


def test_three_models_match_the_likelihood_equations():
    # at the maximum, each model's expected wins equal its actual wins (the Bradley-Terry score equations)
    battles = ([("A", "B", "a")] * 6 + [("A", "B", "b")] * 2 + [("B", "C", "a")] * 5 + [("B", "C", "b")] * 3
               + [("A", "C", "a")] * 4 + [("C", "A", "a")] * 1)
    r = ratings(battles, prior=0)
    strength = {m: 10 ** ((v - 1000) / 400) for m, v in r.items()}
    for m in "ABC":
        actual = sum((a == m and w == "a") or (b == m and w == "b") for a, b, w in battles)
        expected = sum(strength[m] / (strength[m] + strength[b if a == m else a]) for a, b, _ in battles
                       if m in (a, b))
        assert expected == pytest.approx(actual, abs=1e-6)
    assert sum(r.values()) / 3 == pytest.approx(1000.0)


def test_the_prior_keeps_an_unbeaten_model_finite_and_shrinks_towards_the_mean():
    battles = [("A", "B", "a")] * 5
    r = ratings(battles, prior=1.0)
    assert all(math.isfinite(v) for v in r.values())
    assert r["A"] > r["B"]
    # the virtual tie each against an average player: W_A = 5.5, W_B = 0.5; the fit's gap is well below an
    # unbounded one but grows with more evidence
    more = ratings(battles * 4, prior=1.0)
    assert more["A"] - more["B"] > r["A"] - r["B"] > 200


def test_leaderboard_rows_intervals_and_counts():
    battles = [("ppo", "sft", "a")] * 30 + [("ppo", "sft", "b")] * 10 + [("sft", "ppo", "tie")] * 4
    rows = leaderboard(battles, bootstrap=200, seed=0)
    assert [row.model for row in rows] == ["ppo", "sft"]
    top = rows[0]
    assert (top.battles, top.wins, top.losses, top.ties) == (44, 30, 10, 4)
    assert top.lower < top.rating < top.upper
    assert rows[1].upper < 1000 < top.lower  # 30-10 over 44 battles: the intervals do not overlap the mean
    assert leaderboard(battles, bootstrap=200, seed=0) == rows  # seeded


def test_a_bad_winner_or_a_self_battle_is_one_line():
    with pytest.raises(RlhfchatError, match="battle 1: winner must be one of a, b, tie, both_bad, got 'x'"):
        ratings([("A", "B", "a"), ("A", "B", "x")])
    with pytest.raises(RlhfchatError, match="battle 0: a model cannot battle itself"):
        ratings([("A", "A", "a")])
    assert leaderboard([]) == [] and ratings([]) == {}
