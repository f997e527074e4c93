"""The KL estimators the report names (rlhfchat/eval/kl.py), against exact expectations on small distributions.

    pytest tests/test_kl_estimators.py
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhfchat.eval import kl


def test_k1_and_k3_average_to_the_kl_and_trlxs_to_chi2_minus_kl():
    # policy p = [0.5, 0.5], reference q = [0.9, 0.1]; r = log p - log q per outcome, weighted by p (sampled from p)
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    est = kl.token_estimates(p.log() - q.log())
    expected_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0)  # 0.5108
    chi2 = 0.25 / 0.9 + 0.25 / 0.1 - 1  # sum p^2/q - 1 = 1.7778
    assert float((p * est["k1"]).sum()) == pytest.approx(expected_kl, abs=1e-12)
    assert float((p * est["k3"]).sum()) == pytest.approx(expected_kl, abs=1e-12)
    assert float((p * est["trlx"]).sum()) == pytest.approx(chi2 - expected_kl, abs=1e-12)  # 1.2669: 2.5 x the KL
    assert (est["k3"] >= 0).all() and (est["trlx"] >= 0).all() and (est["k1"] < 0).any()


def test_per_reply_sums_each_replys_tokens():
    ln2 = math.log(2.0)
    got = kl.per_reply([torch.tensor([0.0, ln2]), torch.tensor([]), torch.tensor([-ln2])])
    assert got["k1"].tolist() == pytest.approx([ln2, 0.0, -ln2])
    assert got["trlx"].tolist() == pytest.approx([2 - 1 - ln2, 0.0, 0.5 - 1 + ln2])  # e^r - 1 - r
    assert got["k3"].tolist() == pytest.approx([0.5 - 1 + ln2, 0.0, 2 - 1 - ln2])  # e^-r - 1 + r
    assert set(kl.LABELS) == set(kl.ESTIMATORS)
