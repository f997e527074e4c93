"""Reward functions for the loop tests (ppo.rewards kind function, by import path: tests._toy_rewards:NAME)."""

from __future__ import annotations

WORD = "answer"


def says_answer(prompt: list, reply: str, record: dict) -> float:
    """1.0 when the reply contains the word "answer", else 0.0: a check a sceptic can read."""
    return float(WORD in reply.lower())


def not_a_float(prompt: list, reply: str, record: dict) -> str:
    """A broken reward: returns text."""
    return "yes"


def chars(prompt: list, reply: str, record: dict) -> float:
    """The reply's length in characters (eval's `mean_chars` is its mean)."""
    return float(len(reply))
