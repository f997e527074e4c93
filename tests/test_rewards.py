"""Reward components (rlhfchat.train.rewards): weights, the math check, a user's function, one-line errors."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

from rlhfchat.errors import RlhfchatError
from rlhfchat.train.rewards import Rewards, math_reward, needs_reward_model


@dataclass
class C:
    kind: str
    weight: float = 1.0
    function: str | None = None
    name: str | None = None


class FakeScorer:
    """Scores a reply by its length, batched, as the reward model's scorer is called."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, replies):
        self.calls += 1
        return torch.tensor([float(len(r)) for r in replies])


Q = [{"role": "user", "content": "What is 2 + 3?"}]
RECORDS = [{"id": "a", "source": "s", "prompt": Q, "reference": "5"},
           {"id": "b", "source": "s", "prompt": Q, "reference": "5"},
           {"id": "c", "source": "s", "prompt": Q}]
REPLIES = ["2 + 3 = 5. The answer is 5.", "The answer is 6.", "5"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def has_word(prompt, reply, record):\n    return 1.0 if 'answer' in reply else 0.0\n"
        "def bad(prompt, reply, record):\n    return 'yes'\n"
        "def as_int(prompt, reply, record):\n    return len(prompt)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_the_math_check_reads_the_reference():
    assert [math_reward(Q, r, rec) for r, rec in zip(REPLIES, RECORDS)] == [1.0, 0.0, 0.0]  # no reference: 0


def test_components_are_weighted_summed_and_each_reported(user_module):
    scorer = FakeScorer()
    rewards = Rewards([C("reward_model", 0.5), C("math", 2.0), C("function", 1.0, f"{user_module}:has_word")],
                      scorer)
    total, parts = rewards.score([Q] * 3, REPLIES, RECORDS)
    assert parts["reward_model"].tolist() == [27.0, 16.0, 1.0]
    assert parts["math"].tolist() == [1.0, 0.0, 0.0]
    assert parts["has_word"].tolist() == [1.0, 1.0, 0.0]
    assert total.tolist() == pytest.approx([0.5 * 27 + 2 + 1, 0.5 * 16 + 1, 0.5])
    assert scorer.calls == 1  # one batched call for the batch
    assert needs_reward_model([C("reward_model")]) and not needs_reward_model([C("math")])


def test_an_integer_from_a_user_function_counts_as_a_number(user_module):
    total, _ = Rewards([C("function", 1.0, f"{user_module}:as_int")]).score([Q], ["x"], RECORDS[:1])
    assert total.tolist() == [1.0]


@pytest.mark.parametrize("spec, message", [
    ("nomodule_xyz:f", r"ppo.rewards\[0\].function: cannot import 'nomodule_xyz' \(ModuleNotFoundError"),
    ("my_rewards:missing", r"ppo.rewards\[0\].function: module 'my_rewards' has no function 'missing'"),
    ("just_a_name", r"ppo.rewards\[0\].function: expected module:function"),
])
def test_a_bad_function_path_is_one_line(user_module, spec, message):
    with pytest.raises(RlhfchatError, match=message):
        Rewards([C("function", 1.0, spec)])


def test_a_non_number_from_a_user_function_names_the_prompt(user_module):
    rewards = Rewards([C("function", 1.0, f"{user_module}:bad")])
    message = r"^ppo\.rewards\[0\]\.function: reward 'bad' returned str 'yes' for prompt 'a', expected a float$"
    with pytest.raises(RlhfchatError, match=message):
        rewards.score([Q], ["x"], RECORDS[:1])


def test_configuration_errors():
    with pytest.raises(RlhfchatError, match="needs the run's reward model"):
        Rewards([C("reward_model")], scorer=None)
    with pytest.raises(RlhfchatError, match=r"kind: expected one of reward_model, math, function"):
        Rewards([C("judge")])
    with pytest.raises(RlhfchatError, match="two components are named 'math'"):
        Rewards([C("math"), C("math")])
    with pytest.raises(RlhfchatError, match="at least one reward component"):
        Rewards([])
