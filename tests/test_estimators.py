"""Critic-free estimators in ppo_math against hand computations (literal tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfchat.train import ppo_math as pm


def test_grpo_normalises_each_group_by_its_mean_and_std():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # groups of 2: [1, 0], [0, 1], [2, 2]
    adv = pm.group_advantages(scores, 2, "grpo", eps=0.0)
    # group [1, 0]: mean 0.5, std (Bessel) sqrt(0.5) = 0.7071 -> +-0.7071; a group of equal scores gives 0
    s = 0.5 / math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([s, -s, -s, s, 0.0, 0.0])


def test_dr_grpo_only_centres_and_rloo_uses_the_leave_one_out_mean():
    scores = torch.tensor([3.0, 1.0, 2.0, 6.0])  # one group of 4, mean 3
    assert pm.group_advantages(scores, 4, "dr_grpo").tolist() == pytest.approx([0.0, -2.0, -1.0, 3.0])
    # RLOO: r_i minus the mean of the other three: 3 - 3, 1 - 11/3, 2 - 10/3, 6 - 2
    assert pm.group_advantages(scores, 4, "rloo").tolist() == pytest.approx([0.0, 1 - 11 / 3, 2 - 10 / 3, 4.0])


def test_group_advantages_refuse_what_does_not_split_into_groups():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        pm.group_advantages(torch.zeros(6), 4, "grpo")
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        pm.group_advantages(torch.zeros(3), 1, "rloo")
    with pytest.raises(ValueError, match="expected grpo, dr_grpo or rloo"):
        pm.group_advantages(torch.zeros(2), 2, "ppo")


def test_returns_to_go_sum_the_rewards_from_each_token_to_the_end():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.0], [0.5, 2.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # padding after the reply does not count
    torch.testing.assert_close(pm.returns_to_go(rewards, mask), torch.tensor([[0.9, 0.8, 1.0, 0.0],
                                                                             [2.5, 2.0, 0.0, 0.0]]))
    # gamma 0.5: 0.1 + 0.5 * (-0.2 + 0.5 * 1.0) = 0.25
    assert pm.returns_to_go(rewards, mask, gamma=0.5)[0].tolist() == pytest.approx([0.25, 0.3, 1.0, 0.0])


def test_k3_is_zero_where_policy_and_reference_agree_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.0, -1.0, -1.5]])
    # d = ref - logp = [0, 1, -1]: e^0 - 0 - 1 = 0, e^1 - 2 = 0.71828, e^-1 + 1 - 1 = 0.36788
    torch.testing.assert_close(pm.k3_kl(logp, ref), torch.tensor([[0.0, math.e - 2, math.exp(-1)]]))
