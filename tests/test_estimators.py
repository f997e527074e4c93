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


# --------------------------------------------------------------------------------------------------------------
# critic_free_advantages: the per-token rewards and advantages the loop trains on, by hand

# Two prompts x two replies (rows 0-1 share a prompt, rows 2-3 the other), right-padded to 3 tokens.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
SCORES = torch.tensor([1.0, 0.0, 3.0, 1.0])
# log-ratios logp - ref: row 0 [0.5, -1, 2], row 1 [1, 1, pad], row 2 [-2, pad, pad], row 3 [0, 0, 0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -7.0], [-3.0, -7.0, -7.0], [-1.0, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -2.5], [-2.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])


def _on_every_token(per_row: list[float]) -> torch.Tensor:
    return torch.tensor(per_row).unsqueeze(1) * MASK


@pytest.mark.parametrize("estimator, per_row", [
    # grpo: groups [1, 0] and [3, 1]: each mean +-0.5 (or +-1) over a Bessel std of sqrt(0.5) (or sqrt(2)):
    # +-0.7071 both times (eps 1e-6 in the denominator)
    ("grpo", [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 1 / math.sqrt(2), -1 / math.sqrt(2)]),
    # dr_grpo: centred only: [0.5, -0.5], [1, -1]
    ("dr_grpo", [0.5, -0.5, 1.0, -1.0]),
    # rloo: minus the other reply's score: [1 - 0, 0 - 1], [3 - 1, 1 - 3]
    ("rloo", [1.0, -1.0, 2.0, -2.0]),
])
def test_group_estimators_with_the_kl_in_the_loss_put_the_group_advantage_on_every_token(estimator, per_row):
    # ppo.kl_penalty: loss -> the loop passes kl_coef 0: the reward is the advantage on the last real token, and the
    # advantage of every token of a reply is its group advantage (GRPO's outcome supervision, Shao et al. 2024 4.1.2)
    rewards, adv = pm.critic_free_advantages(estimator, SCORES, LOGP, REF, MASK, kl_coef=0.0, group_size=2)
    torch.testing.assert_close(adv, _on_every_token(per_row), rtol=1e-5, atol=1e-5)
    last = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(rewards, _on_every_token(per_row) * last, rtol=1e-5, atol=1e-5)


def test_rloo_with_the_kl_in_the_reward_adds_the_penalties_still_to_come():
    # kl_coef 0.1: per-token penalty -0.1 x (logp - ref); row 0: [-0.05, 0.1, -0.2] and its RLOO advantage 1 on the
    # last token: rewards [-0.05, 0.1, 0.8]; advantages = returns from each token on: [0.85, 0.9, 0.8].
    # row 1: [-0.1, -0.1] + (-1 on the last) -> rewards [-0.1, -1.1], advantages [-1.2, -1.1]
    # row 2: [0.2] + 2 -> 2.2; row 3: no KL -> [-2, -2, -2]
    rewards, adv = pm.critic_free_advantages("rloo", SCORES, LOGP, REF, MASK, kl_coef=0.1, group_size=2)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.8], [-0.1, -1.1, 0.0], [2.2, 0.0, 0.0],
                                                      [0.0, 0.0, -2.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.85, 0.9, 0.8], [-1.2, -1.1, 0.0], [2.2, 0.0, 0.0],
                                                  [-2.0, -2.0, -2.0]]))


def test_reinforce_pp_whitens_the_kl_shaped_returns_over_the_whole_batch():
    # REINFORCE++ (Hu et al. 2025): score on the last token, -beta x (logp - ref) on each, returns-to-go, then
    # (A - mean) / std over every real token of the batch, not per prompt. kl_coef 0.1:
    #   row 0 rewards [-0.05, 0.1, 0.8]  returns [0.85, 0.9, 0.8]
    #   row 1 rewards [-0.1, -0.1]       returns [-0.2, -0.1]
    #   row 2 rewards [3.2]              returns [3.2]
    #   row 3 rewards [0, 0, 1]          returns [1, 1, 1]
    returns = [0.85, 0.9, 0.8, -0.2, -0.1, 3.2, 1.0, 1.0, 1.0]
    mean = sum(returns) / 9  # 0.9389
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 8)  # Bessel-corrected, as whiten
    w = [(x - mean) / std for x in returns]
    rewards, adv = pm.critic_free_advantages("reinforce_pp", SCORES, LOGP, REF, MASK, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.8], [-0.1, -0.1, 0.0], [3.2, 0.0, 0.0],
                                                      [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[w[0], w[1], w[2]], [w[3], w[4], 0.0], [w[5], 0.0, 0.0],
                                                  [w[6], w[7], w[8]]]), rtol=1e-5, atol=1e-5)
    assert float(pm.masked_mean(adv, MASK)) == pytest.approx(0.0, abs=1e-6)  # the batch's mean, not each prompt's


def test_reinforce_pp_over_two_processes_whitens_as_one():
    # rank 0 holds rows 0-1, rank 1 rows 2-3: with the all-reduce, rank 0's advantages are rows 0-1 of the whole
    whole = pm.critic_free_advantages("reinforce_pp", SCORES, LOGP, REF, MASK, kl_coef=0.1)[1]
    other = pm.kl_penalty_rewards(LOGP[2:], REF[2:], SCORES[2:], MASK[2:], 0.1)
    other_ret = pm.returns_to_go(other, MASK[2:])
    mean = float(pm.masked_mean(pm.returns_to_go(pm.kl_penalty_rewards(LOGP, REF, SCORES, MASK, 0.1), MASK), MASK))
    partner = iter([torch.stack([pm.masked_sum(other_ret, MASK[2:]), MASK[2:].sum()]).double(),
                    pm.masked_sum((other_ret - mean) ** 2, MASK[2:]).double().reshape(1)])
    mine = pm.critic_free_advantages("reinforce_pp", SCORES[:2], LOGP[:2], REF[:2], MASK[:2], kl_coef=0.1,
                                     all_reduce=lambda t: t + next(partner))[1]
    torch.testing.assert_close(mine, whole[:2], rtol=1e-5, atol=1e-6)


def test_critic_free_advantages_refuse_gae():
    with pytest.raises(ValueError, match="expected grpo, dr_grpo, rloo or reinforce_pp"):
        pm.critic_free_advantages("gae", SCORES, LOGP, REF, MASK, 0.1, 2)


def test_kl_loss_is_the_token_mean_of_k3_and_pulls_the_policy_to_the_reference():
    # GRPO's KL (Shao et al. 2024 eq. 4): pi_ref/pi - log(pi_ref/pi) - 1 per token, with d = ref - logp.
    # row 0: d = [-0.5, 1, -2]; row 1: d = [-1, -1] (the third token is padding)
    logp = LOGP[:2].clone().requires_grad_(True)
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    tokens = [k3(-0.5), k3(1.0), k3(-2.0), k3(-1.0), k3(-1.0)]
    loss = pm.kl_loss(logp, REF[:2], MASK[:2])
    assert float(loss.detach()) == pytest.approx(sum(tokens) / 5, rel=1e-6)
    # with the minibatch's token count as the denominator (gradient accumulation): the sum over 10 tokens
    assert float(pm.kl_loss(logp, REF[:2], MASK[:2], n_tokens=10)) == pytest.approx(sum(tokens) / 10, rel=1e-6)
    # d k3 / d logp = 1 - e^d, over the 5 tokens: positive where the policy is above the reference (d < 0) and
    # pushes logp down; padding gets no gradient
    loss.backward()
    expected = [[(1 - math.exp(-0.5)) / 5, (1 - math.e) / 5, (1 - math.exp(-2.0)) / 5],
                [(1 - math.exp(-1.0)) / 5, (1 - math.exp(-1.0)) / 5, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(expected))


def test_sequence_kls_sum_each_estimator_over_each_reply():
    # row 1: r = logp - ref = [1, 1] (padding ignored): k1 = 2, k3 = 2 (e^-1 - 1 + 1) = 2 / e, trlx = 2 (e - 2)
    kls = pm.sequence_kls(LOGP, REF, MASK)
    assert float(kls["k1"][1]) == pytest.approx(2.0)
    assert float(kls["k3"][1]) == pytest.approx(2 / math.e, rel=1e-6)
    assert float(kls["trlx"][1]) == pytest.approx(2 * (math.e - 2), rel=1e-6)
    # row 0: r = [0.5, -1, 2]: k1 = 1.5; row 3: r = 0 everywhere: every estimator 0
    assert float(kls["k1"][0]) == pytest.approx(1.5)
    assert all(float(v[3]) == 0.0 for v in kls.values())
    torch.testing.assert_close(kls["trlx"], pm.sequence_kl(LOGP, REF, MASK))
