"""KL(policy || reference) estimators, each with one name used everywhere (results.json, the report's tables and
plots), from per-token log-ratios r = log p_policy(y_t) - log p_ref(y_t) of replies sampled from the policy:

    k1    r                   unbiased for KL; a single reply's value can be negative
    k3    exp(-r) - 1 + r     unbiased for KL and never negative (Schulman, "Approximating KL divergence", 2020;
                              OpenRLHF's and verl's low-variance KL)
    trlx  exp(r) - 1 - r      what trlX logs and its adaptive KL controller reads, and so what `rlhfchat ppo` logs as
                              `kl`: never negative, but NOT an estimate of the KL. Its mean under the policy is
                              chi2(policy || ref) - KL, which grows much faster than the KL once the policy moves
                              (r enters through exp(+r): the tokens the policy made likelier weigh most).

Each is summed over a reply's tokens ("per reply", as the KL penalty in PPO's reward adds up) and averaged over
replies. Pure functions on tensors; tests/test_kl_estimators.py checks them against exact expectations.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k3", "trlx")
LABELS = {
    "k1": "k1 = Σ log-ratio (unbiased)",
    "k3": "k3 = Σ (e^-r − 1 + r) (unbiased, ≥ 0)",
    "trlx": "trlX's Σ (e^r − 1 − r) (≥ 0, not a KL estimate)",
}
"""How a plot or table names each estimator (r: a token's log-ratio log π − log π_ref)."""


def token_estimates(log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each estimator's per-token values. log_ratio: any shape -> the same shape, per estimator."""
    r = log_ratio.double()
    return {"k1": r, "k3": torch.expm1(-r) + r, "trlx": torch.expm1(r) - r}


def per_reply(log_ratios: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each estimator summed over each reply's tokens: a list of N (T_i,) log-ratio tensors -> {name: (N,)}."""
    sums = {name: [] for name in ESTIMATORS}
    for r in log_ratios:
        for name, values in token_estimates(r).items():
            sums[name].append(values.sum())
    return {name: torch.stack(v) if v else torch.zeros(0, dtype=torch.float64) for name, v in sums.items()}
