"""PPO maths, faithful to trlX v0.6.0 (docs/ppo.md lists the differences): pure functions on tensors, no I/O, no
models.

Shapes: `B` samples of a rollout, `R` response tokens (right-padded after the last real token). Every per-token
tensor is `(B, R)` and comes with a `mask` of the same shape: 1 on real response tokens, 0 on padding.

    rewards     = kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)    # (B, R)
    adv, ret    = gae(values, rewards, mask, gamma, lam)                              # (B, R), (B, R)
    adv         = whiten(adv, mask)
    pg, clipfrac = policy_loss(new_logprobs, logprobs, adv, mask, cliprange)
    vf, vclip    = value_loss(new_values, values, ret, mask, cliprange_value)
    loss         = pg + vf_coef * vf

The critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) replace the value head and GAE:

    rewards, adv = critic_free_advantages("grpo", scores, logprobs, ref_logprobs, mask, kl_coef, group_size=4)
    loss         = pg + kl_coef * kl_loss(new_logprobs, ref_logprobs, mask)   # ppo.kl_penalty: loss (kl_coef 0 above)

The losses take an optional `n_tokens` denominator so that a minibatch split into micro-batches for gradient
accumulation gives the same gradient as the whole minibatch in one go (each micro-batch divides by the token
count of the whole minibatch; the micro-batch gradients then sum to the minibatch gradient).

    python -m pytest tests/test_ppo_math.py
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `x` where `mask` is 1. x, mask: (B, R) -> scalar."""
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `x` over the real tokens. x, mask: (B, R) -> scalar.

    `n_tokens` replaces the denominator (mask.sum()) for gradient accumulation; see the module docstring.
    """
    n = mask.sum() if n_tokens is None else n_tokens
    return (x * mask).sum() / n


def masked_moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of `x` over the real tokens, variance Bessel-corrected by default. x, mask: (B, R).

    `all_reduce` sums a tensor over the processes that hold the other rows (trlX v0.6.0's get_global_statistics): the
    moments are then those of every process's tokens together, so n processes with a share each get what one
    process with all of them gets. Sums are taken in float64.
    """
    reduce = all_reduce or (lambda t: t)
    total = reduce(torch.stack([masked_sum(x, mask), mask.sum()]).double())
    n = total[1]
    mean = total[0] / n
    sq = reduce(masked_sum((x - mean) ** 2, mask).double().reshape(1))[0]
    var = sq / ((n - 1).clamp(min=1) if unbiased else n)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the real tokens (Bessel-corrected by default). x, mask: (B, R) -> scalar."""
    return masked_moments(x, mask, unbiased)[1]


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding positions come back as 0. x, mask: (B, R) -> (B, R).

    `all_reduce`: see masked_moments (whitening over every process's tokens, as trlX v0.6.0's distributed whiten).
    """
    if mask is None:
        mask = torch.ones_like(x)
    mean, var = masked_moments(x, mask, all_reduce=all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (logp - ref_logp), plus the score at the last real token of each response.

    logprobs, ref_logprobs, mask: (B, R); scores: (B,). Returns (B, R), zero on padding. The last real token is
    the last position where mask is 1 (responses are right-padded; a response that stopped early is shorter).
    """
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * log_ratio
    last = last_token_index(mask)  # (B,)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask. mask: (B, R) -> (B,) long; 0 for an all-0 row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).amax(dim=1)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per sequence with trlX v0.6.0's estimator, exp(r) - 1 - r with r = logp - ref, summed over
    the response tokens (as trlX's last commit 3340c2f sums it; v0.6.0 averages it over every position: docs/ppo.md).

    (B, R) -> (B,). Non-negative for every sample (unlike the plain sum of log-ratios), which the adaptive
    controller and the logs use; the per-token reward uses the log-ratio itself, as trlX v0.6.0 does.
    """
    log_ratio = (logprobs - ref_logprobs) * mask
    return ((log_ratio.exp() - 1 - log_ratio) * mask).sum(dim=1)


def clip_scores(scores: torch.Tensor, cliprange_reward: float | None) -> torch.Tensor:
    """Reward-model scores clipped to [-cliprange_reward, cliprange_reward]. (B,) -> (B,). None/0: no clipping."""
    if not cliprange_reward:
        return scores
    return scores.clamp(-cliprange_reward, cliprange_reward)


def scale_scores(scores: torch.Tensor, mode: str | None, running_std: float | None = None,
                 ref_std: float | None = None) -> torch.Tensor:
    """trlX v0.6.0's scale_reward: none, `running` (divide by the running std of all scores so far) or `ref`
    (divide by the std of the first batch's scores, or the recipe's ref_std). (B,) -> (B,).

    trlX v0.6.0 scales first and clips after: call scale_scores, then clip_scores.
    """
    if mode in (None, "none"):
        return scores
    if mode == "running":
        return scores / running_std
    if mode == "ref":
        return scores / ref_std
    raise ValueError(f"scale_reward: expected none, running or ref, got {mode!r}")


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (trlX v0.6.0 `get_advantages_and_returns`, over real tokens only).

    values, rewards, mask: (B, R) -> advantages (B, R), returns (B, R) = advantages + values.
    Padding is zeroed first, so the value after the last real token is 0 (the episode ends there) and padding
    positions get advantage 0.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = advantages + values
    return advantages, returns


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages of samples drawn in groups of `group_size` per prompt (rows g*G .. g*G + G - 1 share a
    prompt). scores: (N,) with N a multiple of G -> (N,), one advantage per sample, for every token of its reply.

        grpo     (r_i - mean_g) / (std_g + eps)      GRPO, Shao et al. 2024 (DeepSeekMath); std Bessel-corrected
        dr_grpo  r_i - mean_g                         Dr. GRPO, Liu et al. 2025: no division by the group's std
        rloo     r_i - mean_{j != i} r_j              RLOO, Ahmadian et al. 2024: the leave-one-out baseline,
                 = G / (G - 1) * (r_i - mean_g)

    A group whose samples all score the same gets advantage 0 under each (nothing to learn from it).
    """
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"group_advantages: {scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size).double()
    centred = groups - groups.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        out = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    elif estimator == "dr_grpo":
        out = centred
    elif estimator == "rloo":
        if group_size < 2:
            raise ValueError("group_advantages: rloo needs at least 2 samples per prompt")
        out = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"group_advantages: expected grpo, dr_grpo or rloo, got {estimator!r}")
    return out.reshape(-1).to(scores.dtype)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum over s >= t of gamma^(s - t) r_s, per response. rewards, mask: (B, R) -> (B, R), 0 on padding.

    REINFORCE++ (Hu et al. 2025) takes these returns of the KL-penalised per-token rewards as the advantages, then
    normalises them over the whole batch (whiten): no critic, and no per-prompt group needed.
    """
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def critic_free_advantages(estimator: str, scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                           mask: torch.Tensor, kl_coef: float, group_size: int = 1, gamma: float = 1.0,
                           all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, advantages) without a critic. scores: (N,); logprobs, ref_logprobs, mask: (B, R).

    grpo, dr_grpo, rloo: each sample's score becomes its group's advantage (group_advantages; rows g*G .. g*G + G - 1
    share a prompt), placed on its last token with the per-token KL penalty -kl_coef * (logp - ref) (kl_coef 0 when the
    KL is a loss term instead), and the advantage of token t is the return from t on (returns_to_go). With the KL in
    the loss this is the group advantage on every token of the reply (GRPO's outcome supervision, Shao et al. 2024
    section 4.1.2); with it in the reward, the group advantage plus the penalties still to come (OpenRLHF does the
    same for its group estimators: openrlhf/trainer/ppo_utils/experience_maker.py at commit 01359b4 baselines the
    scores, then adds the per-token KL and takes cumulative returns).
    reinforce_pp: the returns-to-go of the KL-penalised rewards (score on the last token), whitened over the batch's
    tokens (over every process with `all_reduce`): REINFORCE++, Hu et al. 2025.
    """
    if estimator in ("grpo", "dr_grpo", "rloo"):
        shaped = group_advantages(scores, group_size, estimator)
        rewards = kl_penalty_rewards(logprobs, ref_logprobs, shaped, mask, kl_coef)
        return rewards, returns_to_go(rewards, mask, gamma)
    if estimator == "reinforce_pp":
        rewards = kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
        return rewards, whiten(returns_to_go(rewards, mask, gamma), mask, all_reduce=all_reduce)
    raise ValueError(f"critic_free_advantages: expected grpo, dr_grpo, rloo or reinforce_pp, got {estimator!r}")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            n_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's KL term: the mean over tokens of k3_kl (with grad through logprobs). (B, R) -> scalar; `n_tokens` as in
    masked_mean."""
    return masked_mean(k3_kl(logprobs, ref_logprobs), mask, n_tokens)


def sequence_kls(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each estimator of eval/kl.py (k1, k3, trlx) summed over each response's tokens. (B, R) -> {name: (B,)}.

    trlx is sequence_kl itself (in the tensors' dtype), so the default run's adaptive controller reads exactly what
    it read before the other two were logged; k1 and k3 are summed in float64."""
    from rlhfchat.eval.kl import token_estimates

    log_ratio = (logprobs - ref_logprobs) * mask
    out = {name: (values * mask).sum(dim=1).to(logprobs.dtype) for name, values in token_estimates(log_ratio).items()
           if name != "trlx"}
    return {**out, "trlx": sequence_kl(logprobs, ref_logprobs, mask)}


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate GRPO puts in its loss (Schulman's k3): exp(q - p) - (q - p) - 1 with p the policy's
    and q the reference's logprob. (B, R) -> (B, R). Never negative, and on tokens sampled from the policy an unbiased
    estimate of KL(policy || reference) with less variance than p - q."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1.0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, n_tokens: float | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    logprobs (with grad), old_logprobs, advantages, mask: (B, R). Returns (loss, clip fraction, approx KL), all
    scalars; clip fraction is the share of tokens where the clipped term was the larger one.
    """
    n = mask.sum() if n_tokens is None else n_tokens
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = (torch.max(loss1, loss2) * mask).sum() / n
    with torch.no_grad():
        clipfrac = ((loss2 > loss1).float() * mask).sum() / n
        approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / n
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, n_tokens: float | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - G)^2, (clip(V, V_old +- eps) - G)^2).

    values (with grad), old_values, returns, mask: (B, R). Returns (loss, clip fraction), scalars.
    """
    n = mask.sum() if n_tokens is None else n_tokens
    values_clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (values_clipped - returns) ** 2
    loss = 0.5 * (torch.max(loss1, loss2) * mask).sum() / n
    with torch.no_grad():
        clipfrac = ((loss2 > loss1).float() * mask).sum() / n
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. (B, R, V) -> (B, R)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] at each position. logits (B, R, V), labels (B, R) -> (B, R).

    logit[label] - logsumexp(logits), which keeps no (B, R, V) log-softmax tensor alive. Its gradient,
    g * (onehot(label) - softmax(logits)), is written into one (B, R, V) tensor (_LabelLogprob) instead of the several
    autograd writes (a zero tensor for the gather's scatter, the exponential, the product, their sum).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LabelLogprob.apply(logits, labels)
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _LabelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        index = labels.unsqueeze(-1)
        ctx.save_for_backward(logits, index)
        return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, index = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        out = torch.softmax(logits, dim=-1).mul_(-g)
        return out.scatter_add_(-1, index, g), None


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as in trlX v0.6.0).

        error = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + error * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient (trlX v0.6.0 with target=None)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of every score seen so far (trlX v0.6.0 RunningMoments, parallel-variance update).

    Starts at mean 0, var 1, count ~0, so the first update takes the batch's moments. `std` is Bessel-corrected.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's (mean, unbiased std). xs: any shape, all elements count."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        xs_mean = xs.mean().item()
        xs_var = xs.var(unbiased=False).item()
        delta = xs_mean - self.mean
        total = self.count + n
        old_sum = self.var * self.count + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = (old_sum + xs_var * n) / total
        self.std = math.sqrt(self.var * total / (total - 1)) if total > 1 else math.sqrt(self.var)
        self.count = total
        batch_std = math.sqrt(xs_var * n / (n - 1)) if n > 1 else 0.0
        return xs_mean, batch_std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.std, self.count = (float(state[k]) for k in ("mean", "var", "std", "count"))
