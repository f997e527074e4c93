"""What the eval stage asks of a model: replies to prompts and log-probs of replies.

    replies = replies_to(model, tokenizer, prompts, max_new_tokens=48)     # greedy, through rlhfchat/decoding.py
    scores = RewardScorer(reward_dir).score(prompts, [r.text for r in replies])       # rlhfchat.train.reward
    kl = kl_to_reference(ppo_model, sft_model, tokenizer, prompts, max_new_tokens=48, seed=0)

Prompts are canonical message lists rendered through the tokenizer's chat template with the generation prompt
("### Assistant:"); replies end at an end-of-turn token or are cut at the stop sequences (the template's too) and stripped, so `Reply.text` is what a user would see and
what the reward model scores (through `chat_format.reward_text`, the same text reward training and PPO use).

KL of the PPO model to its reference is estimated on the policy's own samples (replies sampled at temperature 1, no
top-k/top-p truncation: the policy's own distribution, up to and including the end token, or the EOS put in a stop
sequence's place, as PPO's rollouts take them), by each
estimator of eval/kl.py; `kl` is k1:
    KL(ppo || ref) ~= mean over prompts of  sum over sampled reply tokens of  (log p_ppo(y_t) - log p_ref(y_t))
and `kl_trlx` is the quantity the PPO stage logs as `kl` (trlX's), for a like-for-like comparison with its log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfchat.data.chat_format import STOP_SEQUENCES
from rlhfchat.decoding import GenerationSettings, Reply, generate_replies

Messages = list[dict[str, str]]


def device_for(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_causal_lm(path: str | Path, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer with our chat template and a pad token) of a folder or hub id."""
    from rlhfchat.models import load_model_folder, load_tokenizer, resolve_model, torch_dtype

    source = resolve_model(path)  # a folder or hub id (offline: one line); a weight delta is refused
    tokenizer = load_tokenizer(source)
    model = load_model_folder(source, dtype=torch_dtype(dtype), what="a causal language model")
    return model.to(device_for(device)).eval(), tokenizer


def _batches(n: int, size: int, desc: str | None):
    from tqdm.auto import tqdm

    starts = range(0, n, max(1, size))
    return tqdm(starts, desc=desc, total=len(starts), leave=False, disable=desc is None)


def last_user_text(prompt: Messages) -> str:
    """The text of the last user message of a prompt (what the math grader reads)."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def replies_to(model: Any, tokenizer: Any, prompts: Sequence[Messages], *, max_new_tokens: int, batch_size: int = 16,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_sequences: Sequence[str] = tuple(STOP_SEQUENCES), max_prompt_length: int | None = None,
               desc: str | None = None) -> list[Reply]:
    """One reply per prompt, in order, through the decoding core (decoding.generate_replies) with the chat
    template's stops. Greedy by default; sampled replies are seeded one per prompt (seed x 1,000,003 + its index),
    so a reply depends on its prompt and the seed alone, not on its batch."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop_sequences=list(stop_sequences)).for_template(tokenizer)
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))] if do_sample else None
    return generate_replies(model, tokenizer, prompts, settings, batch_size=batch_size,
                            max_prompt_length=max_prompt_length, seeds=seeds, desc=desc)


@torch.no_grad()
def sequence_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]], reply_ids: Sequence[Sequence[int]], *,
                      pad_id: int, batch_size: int = 16, desc: str | None = None) -> list[float]:
    """Sum over each reply's tokens of log p(token | prompt, reply so far) under `model`."""
    return [float(t.sum()) for t in token_logprobs(model, prompt_ids, reply_ids, pad_id=pad_id,
                                                   batch_size=batch_size, desc=desc)]


@torch.no_grad()
def token_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]], reply_ids: Sequence[Sequence[int]], *,
                   pad_id: int, batch_size: int = 16, desc: str | None = None) -> list[torch.Tensor]:
    """log p(token | prompt, reply so far) of each reply token under `model`: one (len(reply),) float32 tensor per
    reply, on the CPU.

    Sequences are prompt + reply, right-padded, so positions count from 0 at the first prompt token as they do
    in generation (where left padding is masked out of the positions).
    """
    out: list[torch.Tensor] = []
    for start in _batches(len(prompt_ids), batch_size, desc):
        prompts = prompt_ids[start:start + batch_size]
        seqs = [list(p) + list(r) for p, r in zip(prompts, reply_ids[start:start + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V) predicts ids[:, 1:]
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()  # (B, T-1)
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            out.append(token_logp[i, len(p) - 1:len(s) - 1])  # the reply's tokens ids[len(p):len(s)]
    return out


def kl_to_reference(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Messages], *,
                    max_new_tokens: int, seed: int = 0, batch_size: int = 16, max_prompt_length: int | None = None,
                    stop_sequences: Sequence[str] = tuple(STOP_SEQUENCES), desc: str | None = None) -> dict[str, Any]:
    """Monte-Carlo KL(policy || reference) per reply on replies sampled from the policy (temperature 1, no top-k/p),
    by each estimator of eval/kl.py.

    Returns {"kl": the k1 estimate (mean over prompts of the per-reply sum of log-ratios), "kl_std": its spread
    over prompts, "kl_per_token": k1's total over total tokens, "kl_k3", "kl_trlx": the other estimators' means,
    "n": prompts, "tokens": reply tokens}. Both models must share the tokenizer (the PPO model is the SFT model's
    fine-tune).
    """
    from rlhfchat.eval import kl as estimators

    replies = replies_to(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                         stop_sequences=stop_sequences, max_prompt_length=max_prompt_length,
                         desc=desc and f"{desc}: samples")
    p_ids, r_ids = [r.prompt_ids for r in replies], [r.token_ids for r in replies]
    pad = tokenizer.pad_token_id
    lp_policy = token_logprobs(policy, p_ids, r_ids, pad_id=pad, batch_size=batch_size,
                               desc=desc and f"{desc}: policy log-probs")
    lp_ref = token_logprobs(reference, p_ids, r_ids, pad_id=pad, batch_size=batch_size,
                            desc=desc and f"{desc}: reference log-probs")
    est = estimators.per_reply([a - b for a, b in zip(lp_policy, lp_ref)])  # {name: (n,) per-reply sums}
    kl, tokens = est["k1"], sum(len(r) for r in r_ids)
    return {"kl": float(kl.mean()), "kl_std": float(kl.std(unbiased=False)),
            "kl_per_token": float(kl.sum() / max(tokens, 1)), "kl_k3": float(est["k3"].mean()),
            "kl_trlx": float(est["trlx"].mean()), "n": len(replies), "tokens": tokens}
