"""PPO maths against numbers worked out by hand (the comments show the sums)."""

import math

import pytest
import torch

from rlhfchat.train import ppo_math as pm


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


def test_gae_by_hand():
    # gamma 1, lam 0.5; row 0: values [1, 2, 3], rewards [0, 0, 10]
    #   t=2: delta = 10 + 0 - 3 = 7              A2 = 7
    #   t=1: delta = 0 + 3 - 2 = 1               A1 = 1 + 0.5 * 7 = 4.5
    #   t=0: delta = 0 + 2 - 1 = 1               A0 = 1 + 0.5 * 4.5 = 3.25
    # row 1 stops after 2 tokens: the padded value (99) and reward (99) must not leak in
    #   t=1: delta = 5 + 0 - 2 = 3               A1 = 3
    #   t=0: delta = 0 + 2 - 1 = 1               A0 = 1 + 0.5 * 3 = 2.5
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    rewards = torch.tensor([[0.0, 0.0, 10.0], [0.0, 5.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = pm.gae(values, rewards, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[3.25, 4.5, 7.0], [2.5, 3.0, 0.0]])
    assert close(ret, [[4.25, 6.5, 10.0], [3.5, 5.0, 0.0]])  # returns = A + V, 0 on padding


def test_gae_discount():
    # gamma 0.9, lam 1, values 0, rewards [1, 1]: A1 = 1, A0 = 1 + 0.9 * 1 = 1.9 (the discounted return)
    adv, ret = pm.gae(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert close(adv, [[1.9, 1.0]]) and close(ret, [[1.9, 1.0]])


def test_whiten_by_hand_and_ignores_padding():
    # [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std 1.2910
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)]
    assert close(pm.whiten(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), [expected])
    # the same numbers spread over two padded rows: padding (100) changes nothing and comes back as 0
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert close(pm.whiten(x, mask), [[expected[0], expected[1], 0.0], [expected[2], expected[3], 0.0]])
    assert close(pm.masked_mean(x, mask), 2.5) and close(pm.masked_var(x, mask), 5 / 3)
    assert close(pm.masked_var(x, mask, unbiased=False), 1.25)



def test_whiten_across_processes_equals_one_process():
    # rank 0 holds [1, 2], rank 1 holds [3, 4]: the all-reduce adds rank 1's (sum 7, count 2), then its squared
    # deviations from the global mean 2.5: 0.25 + 2.25 = 2.5. Rank 0 must whiten as if it saw all four numbers.
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2)]
    partner = iter([torch.tensor([7.0, 2.0], dtype=torch.float64), torch.tensor([2.5], dtype=torch.float64)])
    out = pm.whiten(torch.tensor([[1.0, 2.0]]), all_reduce=lambda t: t + next(partner))
    assert close(out, [expected])

def test_policy_loss_by_hand():
    # old logprobs 0, so ratio = exp(logprobs); cliprange 0.2 -> clip to [0.8, 1.2]
    #   ratio 1.5, A=+1: -1.5 vs -1.2 -> -1.2 (clipped, no gradient)
    #   ratio 0.5, A=+1: -0.5 vs -0.8 -> -0.5 (gradient -ratio*A = -0.5)
    #   ratio 1.1, A=-1:  1.1 vs  1.1 ->  1.1 (inside the range, gradient 1.1)
    #   ratio 0.7, A=-1:  0.7 vs  0.8 ->  0.8 (clipped, no gradient)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05, clip fraction 2/4
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipfrac, approx_kl = pm.policy_loss(logprobs, torch.zeros(1, 4), adv, torch.ones(1, 4), cliprange=0.2)
    assert close(loss, 0.05) and close(clipfrac, 0.5)
    r = torch.tensor([1.5, 0.5, 1.1, 0.7])
    assert close(approx_kl, ((r - 1) - r.log()).mean())
    loss.backward()
    assert close(logprobs.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0]])


def test_policy_loss_masks_padding_and_takes_a_denominator():
    logprobs = torch.tensor([[0.1, 5.0]])  # the padded token has a wild ratio: it must not count
    loss, clipfrac, _ = pm.policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
                                       cliprange=0.2)
    assert close(loss, -math.exp(0.1)) and close(clipfrac, 0.0)
    half, _, _ = pm.policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
                                cliprange=0.2, n_tokens=2)
    assert close(half, loss / 2)


def test_value_loss_by_hand():
    # old values 0, cliprange_value 0.2 -> clipped values in [-0.2, 0.2]
    #   V=0.5,  G=1:  (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64  -> 0.64 (clipped)
    #   V=-0.1, G=1:  1.21 vs 1.21                          -> 1.21
    #   V=0.3,  G=-1: (1.3)^2 = 1.69 vs (1.2)^2 = 1.44      -> 1.69
    # loss = 0.5 * (0.64 + 1.21 + 1.69) / 3 = 0.59, clip fraction 1/3
    values = torch.tensor([[0.5, -0.1, 0.3]], requires_grad=True)
    loss, clipfrac = pm.value_loss(values, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3),
                                   cliprange_value=0.2)
    assert close(loss, 0.59) and close(clipfrac, 1 / 3)
    loss.backward()
    # d/dV 0.5 (V - G)^2 / 3 = (V - G) / 3 where unclipped, 0 where the clipped term won
    assert close(values.grad, [[0.0, -1.1 / 3, 1.3 / 3]])


def test_kl_penalty_rewards_score_at_last_real_token():
    # kl_coef 0.1; row 0: log ratio [0.5, 0, -1] -> [-0.05, 0, 0.1], score 5 on the last token -> 5.1
    #              row 1 stopped after 2 tokens: log ratio [1, 0] -> [-0.1, 0], score -3 on token 1, padding 0
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = pm.kl_penalty_rewards(logprobs, ref, torch.tensor([5.0, -3.0]), mask, kl_coef=0.1)
    assert close(rewards, [[-0.05, 0.0, 5.1], [-0.1, -3.0, 0.0]])


def test_last_token_index_and_sequence_kl():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert pm.last_token_index(mask).tolist() == [1, 3, 0]
    # log ratio log 2 on one token: exp(r) - 1 - r = 2 - 1 - log 2; padding ignored
    kl = pm.sequence_kl(torch.tensor([[math.log(2), 9.0], [0.0, 0.0]]), torch.zeros(2, 2),
                        torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert close(kl, [1 - math.log(2), 0.0])


def test_adaptive_kl_controller_by_hand():
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=8)  # error clip(12/6 - 1 = 1) = 0.2 -> 0.1 * (1 + 0.2 * 8 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.00016)
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=1000)  # error 0.1 -> * (1 + 0.1 * 0.1) = 0.101
    assert ctl.value == pytest.approx(0.101)
    ctl.update(0.0, n_steps=1000)  # error clip(-1) = -0.2 -> * 0.98
    assert ctl.value == pytest.approx(0.101 * 0.98)
    restored = pm.AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller():
    ctl = pm.FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_reward_clipping_and_scaling():
    assert close(pm.clip_scores(torch.tensor([15.0, -12.0, 3.0]), 10.0), [10.0, -10.0, 3.0])
    assert close(pm.clip_scores(torch.tensor([15.0]), None), [15.0])
    assert close(pm.scale_scores(torch.tensor([4.0, -2.0]), "none"), [4.0, -2.0])
    assert close(pm.scale_scores(torch.tensor([4.0, -2.0]), "ref", ref_std=2.0), [2.0, -1.0])
    # trlX order: scale by the running std, then clip: [10, -20] / 2 = [5, -10] -> clip 8 -> [5, -8]
    scaled = pm.scale_scores(torch.tensor([10.0, -20.0]), "running", running_std=2.0)
    assert close(pm.clip_scores(scaled, 8.0), [5.0, -8.0])


def test_running_moments_by_hand():
    rm = pm.RunningMoments()
    mean, std = rm.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(5 / 3))
    assert rm.mean == pytest.approx(2.5) and rm.std == pytest.approx(math.sqrt(5 / 3))
    rm.update(torch.tensor([5.0, 6.0]))  # now all of 1..6: mean 3.5, unbiased var 17.5 / 5 = 3.5
    assert rm.mean == pytest.approx(3.5) and rm.std == pytest.approx(math.sqrt(3.5))
    copy = pm.RunningMoments()
    copy.load_state_dict(rm.state_dict())
    assert copy.state_dict() == rm.state_dict()


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])  # p = [.5, .5] then [.75, .25]
    lp = pm.logprobs_of_labels(logits, torch.tensor([[1, 0]]))
    assert close(lp, [[math.log(0.5), math.log(0.75)]])
    ent = pm.entropy_from_logits(logits)
    assert close(ent, [[math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]])


def test_logprob_gradient_is_onehot_minus_softmax():
    """d logp[label] / d logits = onehot(label) - softmax(logits), times the incoming gradient, by hand."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]], requires_grad=True)  # p = [.5, .5] then [.75, .25]
    lp = pm.logprobs_of_labels(logits, torch.tensor([[1, 0]]))
    assert close(lp, [[math.log(0.5), math.log(0.75)]])
    (lp * torch.tensor([[2.0, -1.0]])).sum().backward()
    assert close(logits.grad, [[[2 * (0 - 0.5), 2 * (1 - 0.5)], [-1 * (1 - 0.75), -1 * (0 - 0.25)]]])
    wide = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)  # and against autograd's own
    labels = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: pm.logprobs_of_labels(x, labels), (wide,))
