"""One iteration's rollout as the update reads it: left-padded prompts, right-padded replies, their per-token figures.

    exp = merge([chunk, chunk, ...], pad_id)      # generation chunks of different widths -> one Experience
    mb = exp.select(rows)                          # a minibatch, without the columns that are padding in all its rows
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class Experience:
    """One iteration's rollout, every chunk padded to a common width. N samples, P prompt and R response columns."""

    input_ids: torch.Tensor  # (N, P + R) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (N, P + R)
    n_prompt: int  # P
    mask: torch.Tensor  # (N, R) float, 1 on real response tokens
    logprobs: torch.Tensor  # (N, R) policy logprobs at generation time
    ref_logprobs: torch.Tensor  # (N, R)
    values: torch.Tensor | None  # (N, R); None for the critic-free estimators
    scores: torch.Tensor  # (N,) raw rewards (the weighted sum of ppo.rewards' components)
    entropy: torch.Tensor  # (N, R)
    rewards: torch.Tensor | None = None  # (N, R) after step 4
    advantages: torch.Tensor | None = None  # (N, R)
    returns: torch.Tensor | None = None  # (N, R)

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows `idx`, with columns that are padding in every selected row dropped (less work per minibatch)."""
        attn = self.attention_mask[idx]
        first = int((attn[:, : self.n_prompt].sum(0) > 0).nonzero()[0])
        width = max(int(self.mask[idx].sum(1).max()), 1)
        cols = slice(first, self.n_prompt + width)
        per_token = {f.name: getattr(self, f.name)[idx][:, :width] for f in fields(self)
                     if f.name in ("mask", "logprobs", "ref_logprobs", "values", "entropy", "rewards", "advantages",
                                   "returns") and getattr(self, f.name) is not None}
        return Experience(input_ids=self.input_ids[idx][:, cols], attention_mask=attn[:, cols],
                          n_prompt=self.n_prompt - first, scores=self.scores[idx], **{"values": None, **per_token})


def merge(chunks: Sequence[Experience], pad_id: int) -> Experience:
    """Concatenate chunks of different widths: prompts re-padded on the left, responses on the right."""
    p = max(c.n_prompt for c in chunks)
    r = max(c.mask.shape[1] for c in chunks)

    def pad_seq(c: Experience, name: str, value: int) -> torch.Tensor:
        x = getattr(c, name)
        prompt, response = x[:, : c.n_prompt], x[:, c.n_prompt:]
        left = prompt.new_full((x.shape[0], p - c.n_prompt), value)
        right = response.new_full((x.shape[0], r - response.shape[1]), value)
        return torch.cat([left, prompt, response, right], dim=1)

    def pad_tok(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, r - x.shape[1]))

    per_token = [n for n in ("mask", "logprobs", "ref_logprobs", "values", "entropy")
                 if getattr(chunks[0], n) is not None]
    tensors = {"values": None, **{name: torch.cat([pad_tok(getattr(c, name)) for c in chunks]) for name in per_token}}
    return Experience(
        input_ids=torch.cat([pad_seq(c, "input_ids", pad_id) for c in chunks]),
        attention_mask=torch.cat([pad_seq(c, "attention_mask", 0) for c in chunks]),
        n_prompt=p, scores=torch.cat([c.scores for c in chunks]), **tensors,
    )
