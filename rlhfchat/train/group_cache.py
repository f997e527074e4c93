"""Generation for rows that come in groups of one prompt (GRPO's `samples_per_prompt`): each group's prompt is
prefilled once and its keys and values are kept once for all of the group's rows.

    g = group_size(prompt_ids, prompt_mask)        # rows in consecutive runs of g identical prompts (1: none)
    cache, ids, mask = grouped_prefill(trunk, prompt_ids, prompt_mask, g, True, empty_cache)  # one row per group
    cache = decoding.grouped_cache(cache, rows=prompt_ids.shape[0], reserve=max_new_tokens)
    with grouped_attention(trunk, cache):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, ...)

The cache of B rows of P prompt columns generating R new tokens holds B/g x (P - 1) + B x (R + 1) positions instead
of B x (P + R): for the benchmark's first 16 prompts (61 columns) x 4 samples of 32 tokens on its 6-block, 512-wide
Llama, 22.5 + 49.5 MB instead of 139.5 MB, and the prompts' prefill runs on 16 rows instead of 64. Generate then
runs the prompts' last column and every new token on all B rows; in each block the rows' queries read their group's
prompt keys (one copy, never repeated in memory) and their own new ones, under one softmax
(`grouped_attention_forward`, reading decoding.grouped_cache's layers). The result is the plain layout's, up to
float rounding (which can change a sample where a draw falls at a token boundary, and so a seeded run's path).

Applies where a trunk's attention goes through transformers' attention interface as sdpa or eager, without a
sliding window, with a cache of plain dynamic layers (`groupable`: not a hybrid model's convolution states);
elsewhere generation keeps its plain cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
from torch import nn

from rlhfchat.errors import RlhfchatError
from rlhfchat.train.trunk import (_configs, attention_switched, cache_argument, position_ids_from_mask,
                                  split_shared_prefix)

GROUPED = "rlhfchat_grouped"
"""The attention implementation a trunk is switched to while it generates from a grouped cache."""

_active: contextvars.ContextVar[Any] = contextvars.ContextVar("rlhfchat_grouped_cache", default=None)


def group_size(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """g where the rows come in consecutive runs of g identical prompts (ids and mask), g > 1; else 1."""
    b, p = prompt_ids.shape
    if b < 2 or p < 2:
        return 1
    same = ((prompt_ids == prompt_ids[:1]) & (prompt_mask == prompt_mask[:1])).all(1)
    g = int(same.long().cumprod(0).sum())
    if g < 2 or b % g:
        return 1
    rows = torch.stack([prompt_ids, prompt_mask.to(prompt_ids.dtype)], -1).view(b // g, g, p, 2)
    return g if bool((rows == rows[:, :1]).all()) else 1


def groupable(trunk: nn.Module, cache: Any) -> bool:
    """Whether a trunk can generate from a grouped cache: the cache generate would make for it (`cache`) has only
    plain dynamic layers (not a hybrid model's convolution or linear-attention states), its attention goes through
    transformers' attention interface as sdpa or eager in every config its modules read (none with sub-configs or a
    sliding window), its attention modules know their block (`layer_idx`), and it takes a cache argument."""
    from transformers.cache_utils import DynamicLayer

    configs = _configs(trunk)
    if not (getattr(trunk, "_supports_attention_backend", False) and configs and cache_argument(trunk)):
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    if any(c._attn_implementation not in ("sdpa", "eager") or getattr(c, "sub_configs", None)
           or getattr(c, "sliding_window", None) or getattr(c, "attn_logit_softcapping", None) for c in configs):
        return False
    attentions = [m for m in trunk.modules() if type(m).__name__.endswith("Attention")]
    return bool(attentions) and all(isinstance(getattr(m, "layer_idx", None), int) for m in attentions)


def grouped_prefill(trunk: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, g: int,
                    share_prefix: bool, empty: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Prefill each group's prompt but its last column, once: one row per group. `empty`: the cache generate would
    make, filled when no shared prefix is split off. -> (cache, input_ids, attention_mask): the cache, for
    decoding.grouped_cache to make grouped, and the rows' prompts for generate in the layout it was filled in (with
    share_prefix, the tokens all prompts share are prefilled once: split_shared_prefix).
    """
    ids, mask = prompt_ids[::g], prompt_mask[::g]  # (U, P): one row per group
    split = split_shared_prefix(trunk, ids, mask, prompt_ids.shape[1] - 1) if share_prefix else None
    if split is not None:
        cache, s = split.cache(trunk), split.prefix.shape[1]
        ids, mask = split.rest_ids, split.full_mask()
        rows_ids, rows_mask = split.full_ids().repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    else:
        cache, s, rows_ids, rows_mask = empty, 0, prompt_ids, prompt_mask
    if ids.shape[1] > 1:  # the prompt columns after the shared prefix, but the last
        positions = position_ids_from_mask(mask)[:, s:-1]
        trunk(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, use_cache=True,
              **{cache_argument(trunk): cache})
    return cache, rows_ids, rows_mask


def grouped_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of B rows in groups of g over their group's prompt (U = B / g rows of P' keys in the layer) and their
    own keys. query (B, heads, q, D), key and value (B, kv heads, n, D) -> (B, q, heads, D).

    A group's g x (heads per kv head) x q queries are one block of queries against its prompt's keys, so the prompt
    part is never repeated in memory; one softmax runs over the prompt's and the rows' scores together. attention_mask
    (B, 1, q, P' + n): True (or 0) where a query may read.
    """
    cache = _active.get()
    if cache is None:
        raise RlhfchatError(f"{GROUPED} attention runs only inside grouped_attention")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
        raise RlhfchatError(f"{GROUPED} attention: {type(module).__name__} needs a soft cap, attention sinks or a "
                            "sliding window, which it does not compute")
    kp, vp = cache.layers[module.layer_idx].prompt
    b, heads, q, d = query.shape
    u, kv_heads, p = kp.shape[:3]
    g, r, n, dv = b // u, heads // kv_heads, key.shape[2], value.shape[-1]
    scale = scaling if scaling is not None else d ** -0.5

    def fold(x: torch.Tensor) -> torch.Tensor:  # (B, heads, q, X) -> (U, kv heads, g x r x q, X)
        return x.reshape(u, g, kv_heads, r, q, x.shape[-1]).transpose(1, 2).reshape(u, kv_heads, g * r * q, -1)

    def unfold(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.reshape(u, kv_heads, g, r, q, x.shape[-1]).transpose(1, 2).reshape(b, heads, q, -1)

    def own(x: torch.Tensor) -> torch.Tensor:  # (B, heads, q, X) -> (B, kv heads, r x q, X)
        return x.reshape(b, kv_heads, r * q, x.shape[-1])

    scores = torch.cat([unfold(fold(query) @ kp.transpose(-1, -2)),
                        (own(query) @ key.transpose(-1, -2)).reshape(b, heads, q, n)], -1) * scale
    if attention_mask is not None:
        mask = attention_mask[..., -scores.shape[-1]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif q > 1:  # no mask given (nothing padded): the queries are the last q of the rows' own n keys, causal
        later = torch.arange(n, device=query.device)[None, :] > torch.arange(n - q, n, device=query.device)[:, None]
        scores[..., p:] = scores[..., p:].masked_fill(later, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    on_prompt, on_own = probs.split([p, n], -1)
    out = unfold(fold(on_prompt) @ vp).float() + (own(on_own) @ value).reshape(b, heads, q, dv).float()
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def grouped_attention(trunk: nn.Module, cache: Any) -> contextlib.AbstractContextManager:
    """Inside this block the trunk's attention is grouped_attention_forward over `cache`, with sdpa's boolean masks
    (trunk.attention_switched)."""
    from transformers.masking_utils import sdpa_mask

    return attention_switched(trunk, GROUPED, grouped_attention_forward, sdpa_mask, _active, cache)
