"""Rollouts: prompts in, left-padded prompt tensors and cut, right-padded response tensors out.

    settings = GenerationSettings.from_ppo(recipe.ppo, tokenizer)           # rlhfchat/decoding.py
    prompt_ids = [encode_prompt(tokenizer, p, 256) for p in prompts]        # chat messages or a verbatim string
    rollout = generate_rollout(model, tokenizer, prompt_ids, settings)      # Rollout: (B, P) and (B, R) tensors

The decoding itself (settings, the seeded sampler, stops) is rlhfchat/decoding.py, shared with evaluation and chat.

A response ends at the first EOS or end-of-turn token (kept, it is a real token the policy chose) or, failing that, at the first stop
sequence: the tokens are cut where the stop text begins and an EOS takes its place, as trlX v0.6.0 does (it trims the
text and appends EOS). A response that runs to max_new_tokens has no EOS. Everything after the end is padding
with mask 0, so the reward-model score lands on the last real token and never on padding.

Backends: `hf` (transformers generate with a KV cache; `capture=True` keeps the last hidden state of every step,
from which PPO gets the old logprobs and values) and `vllm` (rollout_vllm.py: GPU only, an optional extra).

Seeded sampling (`seeds=[...]`, one per row): row i's reply depends only on seeds[i] and its own logits, not on
the other rows of the batch, its padding or the global RNG, so a run on 2 processes samples what a run on 1 does:

    generate_rollout(model, tokenizer, prompt_ids, settings, seeds=[1000 + i for i in range(len(prompt_ids))])

(Under DeepSpeed ZeRO-3 the PPO loop generates inside `Runtime.generation`, which gathers the sharded weights once for
the whole call instead of layer by layer at every step.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlhfchat.decoding import GenerationSettings, finish_responses, hf_generate, left_pad
from rlhfchat.errors import RlhfchatError


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R) 1 on real tokens (EOS included), 0 on padding
    texts: list[str]  # the decoded replies, cut at stop sequences, without surrounding whitespace
    ended: torch.Tensor  # (B,) bool: EOS or a stop sequence ended the reply (False: ran to max_new_tokens)
    hidden: torch.Tensor | None = None  # (B, R, H) the trunk's last hidden state before each token (capture=True)

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def check_backend(name: str) -> None:
    """Fail early, in one line naming the field, for a rollout backend that cannot run here."""
    if name == "hf":
        return
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RlhfchatError("ppo.rollout_backend: vllm is not installed; install it with "
                                "pip install 'rlhfchat[vllm]' (GPU only) or set ppo.rollout_backend=hf") from None
        if not torch.cuda.is_available():
            raise RlhfchatError("ppo.rollout_backend: vllm needs a CUDA GPU and none is visible; "
                                "set ppo.rollout_backend=hf")
        return
    raise RlhfchatError(f"ppo.rollout_backend: expected hf or vllm, got {name!r}")


def generate_rollout(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                     settings: GenerationSettings, backend: str = "hf", device: Any = None,
                     capture: bool = False, seeds: Sequence[int] | None = None) -> Rollout:
    """One generation batch: encoded prompts -> Rollout (left-padded prompts, cut and masked responses).

    seeds: one per prompt for sampling that does not depend on the batch (see SeededSampler); None: global RNG.
    """
    check_backend(backend)
    if backend != "hf":  # vLLM holds its own copy of the weights: rollout_vllm.VLLMRollouts.generate
        raise RlhfchatError(f"ppo.rollout_backend: {backend} rollouts go through rollout_vllm.VLLMRollouts, "
                            "not generate_rollout")
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    gen = hf_generate(model, tokenizer, ids, mask, settings, capture=capture, seeds=seeds)
    response_ids, response_mask, texts, ended = finish_responses(gen.tokens, tokenizer, settings.stop_sequences,
                                                                 settings.stop_token_ids)
    return Rollout(ids, mask, response_ids, response_mask, texts, ended, gen.hidden)
