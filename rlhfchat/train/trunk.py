"""How a Hugging Face trunk runs on left-padded rows: their positions, the prompt prefix they share, the last MLP.

    states = hidden_from(trunk, input_ids, attention_mask, start)   # (B, T - start, H): columns start .. T - 1

- The leading tokens every row of a batch has in common (a system prompt) go through the trunk once. A forward
  (`hidden_from`: the PPO update, the reference, the reward model) runs the batch *packed*: one sequence of the prefix
  followed by every row's rest, under an attention function registered with transformers that lets each row's
  columns read the prefix and the row's own earlier columns. Generation keeps a KV cache instead: the prefix is
  prefilled once and its cache repeated for every row (`SharedPrefix.cache`).
- The last block's MLP runs only on the columns a caller reads (`last_mlp_from`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rlhfchat.errors import RlhfchatError


def causal_parts(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(trunk, output layer) of a HF causal LM, also when peft wraps it (the LoRA layers live inside the trunk)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    trunk = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if trunk is None or head is None:
        raise RlhfchatError(f"{type(base).__name__}: expected a causal LM with a trunk and an output layer")
    return trunk, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as HF generate counts them under left padding: 0 at the first real token. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The trunk's last hidden state. (B, T) -> (B, T, H)."""
    out = trunk(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


MIN_SHARED_PREFIX = 8
"""Fewer shared leading tokens than this are not worth the split (generation's second trunk call, the packed mask)."""


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> int:
    """How many leading real tokens every left-padded row has in common (a system prompt, a template's opening).

    Only tokens before column `start` count, so every row still computes its own state from column `start` on.
    """
    if input_ids.shape[0] < 2:
        return 0
    first = attention_mask[:, : start + 1].long().argmax(-1)  # (B,) the first real column of each row
    limit = start - int(first.max())
    if limit <= 0:
        return 0
    cols = first[:, None] + torch.arange(limit, device=input_ids.device)  # (B, limit)
    tokens = input_ids.gather(1, cols)
    same = (tokens == tokens[:1]).all(0)  # (limit,)
    return int(same.long().cumprod(0).sum())


def cache_argument(trunk: nn.Module) -> str | None:
    """The name a HF trunk takes its KV cache under (`cache` in recent transformers, `past_key_values` before)."""
    params = inspect.signature(trunk.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass
class SharedPrefix:
    """Left-padded rows split into the leading tokens they all share and the rest of each row.

    The rest keeps the rows' columns from `left + len(prefix)` on (`left`: the padding every row has), left-padded,
    with each row's own prefix tokens that fall there (rows with more padding start later) masked out.
    """

    prefix: torch.Tensor  # (1, S)
    rest_ids: torch.Tensor  # (B, T - left - S)
    rest_mask: torch.Tensor  # (B, T - left - S)
    left: int

    def cache(self, trunk: nn.Module) -> Any:
        """The trunk's KV cache of the prefix, repeated for every row (the trunk must take one: cache_argument)."""
        s = self.prefix.shape[1]
        out = trunk(input_ids=self.prefix, position_ids=torch.arange(s, device=self.prefix.device)[None],
                    use_cache=True)
        cache = getattr(out, cache_argument(trunk))
        cache.batch_repeat_interleave(self.rest_ids.shape[0])
        return cache

    def full_ids(self) -> torch.Tensor:
        """The rows' ids over prefix + rest (what `full_mask` masks). (B, S + T - left - S)."""
        return torch.cat([self.prefix.expand(self.rest_ids.shape[0], -1), self.rest_ids], 1)

    def full_mask(self) -> torch.Tensor:
        """The attention mask over prefix + rest. (B, S + T - left - S)."""
        return torch.cat([self.rest_mask.new_ones(self.rest_mask.shape[0], self.prefix.shape[1]), self.rest_mask], 1)


def split_shared_prefix(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        start: int) -> SharedPrefix | None:
    """The split of left-padded rows whose columns from `start` on each row computes itself, or None when sharing
    does not apply: fewer than MIN_SHARED_PREFIX shared tokens, or sliding-window attention (a row's window would
    have to cut into the prefix)."""
    s = shared_prefix_length(input_ids, attention_mask, start)
    if s < MIN_SHARED_PREFIX or getattr(getattr(trunk, "config", None), "sliding_window", None):
        return None
    first = attention_mask[:, : start + 1].long().argmax(-1)
    left = int(first.min())
    rest_ids = input_ids[:, left + s :]
    cols = torch.arange(rest_ids.shape[1], device=input_ids.device)
    rest_mask = attention_mask[:, left + s :] * (cols[None, :] >= (first - left)[:, None])
    return SharedPrefix(input_ids[:1, int(first[0]) : int(first[0]) + s], rest_ids, rest_mask, left)


def text_config(model: nn.Module) -> Any:
    """A model's config, or the text part of a multimodal one."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def decoder_blocks(trunk: nn.Module) -> nn.ModuleList:
    """The trunk's decoder blocks: its ModuleList child with config.num_hidden_layers entries (`layers`, `h`, ...)."""
    n = getattr(text_config(trunk), "num_hidden_layers", None)
    for child in trunk.children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return child
    raise RlhfchatError(f"{type(trunk).__name__}: cannot find its list of {n} decoder blocks")


def _replayed(trunk: nn.Module) -> bool:
    """Whether the backward of a forward now replays the trunk's blocks (gradient checkpointing): transformers' own,
    on the trunk or its blocks, or a checkpoint wrapper around the blocks (accelerate's FSDP activation checkpointing).
    """
    if not (trunk.training and torch.is_grad_enabled()):
        return False
    if getattr(trunk, "gradient_checkpointing", False):
        return True
    try:
        blocks = decoder_blocks(trunk)
    except (RlhfchatError, AttributeError):
        return False
    return any(getattr(b, "gradient_checkpointing", False) or hasattr(b, "_checkpoint_wrapped_module") for b in blocks)


@contextlib.contextmanager
def last_mlp_from(trunk: nn.Module, columns: int | torch.Tensor) -> Iterator[None]:
    """Inside this block the trunk's last decoder block runs its MLP only on `columns`: the columns from an int on,
    or the columns a sorted 1-D index tensor names. The other columns get a zero MLP output.

    The last block's output is the trunk's output, and nothing reads it at the columns a caller drops: their MLP (two
    thirds of a Llama block's weights) is wasted work, in a PPO step on the prompt columns of every row and on the
    whole shared prefix. The MLP works on each position alone, so the kept columns get the values, and the weights
    the gradients, of the whole forward (up to float rounding). Only an MLP called with the hidden states alone is
    narrowed (Bloom's also takes the residual), and only a call wide enough to hold every kept column. Does nothing
    where the blocks or their `mlp` are not found, inside another such block, and where the backward replays the
    block (gradient checkpointing), which happens outside this one.
    """
    try:
        block = decoder_blocks(trunk)[-1]
    except (RlhfchatError, AttributeError):
        block = None
    mlp = getattr(block, "mlp", None)
    index = columns if isinstance(columns, torch.Tensor) else None
    need = int(columns) if index is None else int(index[-1]) + 1 if len(index) else 0  # the narrowest call narrowed
    if need <= 0 or not isinstance(mlp, nn.Module) or getattr(mlp, "_rlhfchat_narrowed", False) or _replayed(trunk):
        yield
        return
    widths: list[int | None] = []  # the input's columns, per call (None: left whole)

    def narrow(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        x = args[0] if len(args) == 1 and not kwargs else None
        widths.append(x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] >= need else None)
        if widths[-1] is None:
            return None
        return ((x[:, need:].contiguous() if index is None else x.index_select(1, index),), {})

    def widen(module: nn.Module, args: tuple, out: Any) -> Any:
        width = widths.pop()
        if width is None:
            return None
        states = out[0] if isinstance(out, tuple) else out  # an MoE block's (states, router scores)
        if index is None:
            states = F.pad(states, (0, 0, width - states.shape[1], 0))
        else:
            states = states.new_zeros(states.shape[0], width, states.shape[2]).index_copy(1, index, states)
        return (states, *out[1:]) if isinstance(out, tuple) else states

    hooks = [mlp.register_forward_pre_hook(narrow, with_kwargs=True), mlp.register_forward_hook(widen)]
    mlp._rlhfchat_narrowed = True
    try:
        yield
    finally:
        del mlp._rlhfchat_narrowed
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------------------------------------------------------
# The packed forward: one sequence of the shared prefix (S tokens) followed by the real tokens of B rows (N in all);
# the rows' padding (left of the prompt, right of a reply that stopped early) never goes through the trunk.

PACKED = "rlhfchat_packed"
"""The attention implementation a trunk is switched to for a packed forward (see packed_forward)."""


@dataclass
class PackedRows:
    prefix_len: int  # S
    rows: int  # B
    width: int  # L: the rows' columns after the prefix, padding included
    # Where the rows' padding is left out (see packed_hidden), else None (N = B * L):
    slot: torch.Tensor | None  # (B * L,) long: each column's token among the N after the prefix (padding: a neighbour)
    real: torch.Tensor | None  # (N,) long: the columns (of the B * L) that hold a real token, in packing order
    mask: torch.Tensor  # (B, 1, L, S + L) bool: a row's queries read the prefix and the row's own earlier real tokens


_packed_rows: contextvars.ContextVar[PackedRows | None] = contextvars.ContextVar("rlhfchat_packed_rows", default=None)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention on a packed batch. (1, heads, S + N, D) each (keys and values: their own head
    count) -> (1, S + N, heads, D).

    The prefix attends causally to itself. The rows' tokens are laid out as B rows of L columns again; each row
    attends to the prefix's keys and values (one copy, expanded to the rows) and to its own, under the layout's
    mask. `attention_mask` (None, see packed_forward) is unused.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layout = _packed_rows.get()
    if layout is None:
        raise RlhfchatError(f"{PACKED} attention runs only inside packed_forward")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    s, b, width = layout.prefix_len, layout.rows, layout.width
    n = query.shape[2] - s
    # split, not sliced: the backward of a split is one cat of the parts' gradients, where each slice's would be a
    # zero tensor of the whole width plus a copy, summed afterwards
    (q_prefix, q_rows), (k_prefix, k_rows), (v_prefix, v_rows) = (x.split([s, n], 2) for x in (query, key, value))

    def rows(x: torch.Tensor) -> torch.Tensor:  # (1, h, N, D) -> (B, h, L, D)
        x = x.squeeze(0) if layout.slot is None else x.squeeze(0).index_select(1, layout.slot)
        return x.unflatten(1, (b, width)).transpose(0, 1)

    def with_prefix(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # -> (B, h, S + L, D)
        return torch.cat([prefix.expand(b, -1, -1, -1), rows(x)], 2)

    prefix, _ = sdpa(module, q_prefix, k_prefix, v_prefix, None, **kwargs)
    out, _ = sdpa(module, rows(q_rows), with_prefix(k_prefix, k_rows), with_prefix(v_prefix, v_rows), layout.mask,
                  **kwargs)  # (B, L, heads, D)
    out = out.flatten(0, 1) if layout.real is None else out.flatten(0, 1).index_select(0, layout.real)
    return torch.cat([prefix, out[None]], 1), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of the packed implementation: packed_attention builds its own."""
    return None


def _configs(trunk: nn.Module) -> list[Any]:
    """Every distinct config the trunk's modules read: a block copied with copy.deepcopy (FrozenBranch) has its own."""
    found = {id(m.config): m.config for m in trunk.modules()
             if hasattr(getattr(m, "config", None), "_attn_implementation")}
    return list(found.values())


def packable(trunk: nn.Module) -> bool:
    """Whether a trunk can run a packed forward: its attention goes through transformers' attention interface and
    is sdpa (not eager, not a flash kernel) in every config its modules read, none of which has sub-configs, and the
    backward does not replay its blocks (gradient checkpointing would replay them outside the packed attention)."""
    configs = _configs(trunk)
    return (bool(getattr(trunk, "_supports_attention_backend", False)) and bool(configs) and not _replayed(trunk)
            and all(c._attn_implementation == "sdpa" and not getattr(c, "sub_configs", None) for c in configs))


@contextlib.contextmanager
def _registered(interface: Any, name: str, function: Any) -> Iterator[None]:
    """`function` registered with a transformers interface (attention, attention mask) under `name` for the block,
    and whatever was there before put back after: nothing outlives the call."""
    mapping = interface._global_mapping
    before = mapping.get(name, _registered)
    interface.register(name, function)
    try:
        yield
    finally:
        if before is _registered:
            mapping.pop(name, None)
        else:
            mapping[name] = before


@contextlib.contextmanager
def attention_switched(trunk: nn.Module, name: str, attention: Any, mask: Any, var: contextvars.ContextVar,
                       value: Any) -> Iterator[None]:
    """Inside this block the trunk's attention is `attention` (and its mask function `mask`), registered with
    transformers under `name` in every config its modules read, with `var` set to `value` for it to read; the
    registrations, the configs' attention setting and `var` are all undone when it ends."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    switched = [(config, config._attn_implementation) for config in _configs(trunk)]
    token = var.set(value)
    try:
        with _registered(AttentionInterface, name, attention), _registered(AttentionMaskInterface, name, mask):
            for config, _ in switched:
                config._attn_implementation = name
            yield
    finally:
        for config, inner in switched:
            config._attn_implementation = inner
        var.reset(token)


def packed_forward(trunk: nn.Module, layout: PackedRows) -> contextlib.AbstractContextManager:
    """Inside this block the trunk's attention is packed_attention over `layout` (attention_switched)."""
    return attention_switched(trunk, PACKED, packed_attention, _no_mask, _packed_rows, layout)


PACK_PADDING_FROM = 0.1
"""packed_hidden leaves the rows' padding out of the trunk from this share of their columns on; below it, gathering
the real tokens into rows for the attention costs about what the padding's share of the forward saves."""


def packed_hidden(trunk: nn.Module, split: SharedPrefix, first: int) -> torch.Tensor:
    """The trunk's last hidden states of the rest's columns `first`.. of every row, in one packed forward of the prefix
    and the rows. -> (B, L - first, H).

    Where padding (left of a prompt, right of a reply that stopped early) is at least PACK_PADDING_FROM of the rows'
    columns, only their real tokens are packed, and a padding column gets a neighbour's state.
    """
    s, (b, width) = split.prefix.shape[1], split.rest_ids.shape
    device = split.rest_ids.device
    real = split.rest_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = torch.cat([causal.new_ones(b, width, s), causal & real[:, None, :]], 2)[:, None]
    positions = s + position_ids_from_mask(split.rest_mask)  # from the prefix on
    kept = real if real.sum() <= (1 - PACK_PADDING_FROM) * real.numel() else torch.ones_like(real)
    slot = (kept.reshape(-1).cumsum(0) - 1).clamp(min=0)  # row-major: a row's tokens follow the row before's
    read = s + slot.view(b, width)[:, first:][kept[:, first:]]  # the last MLP's columns: those returned
    if kept is real:
        layout = PackedRows(s, b, width, slot, real.reshape(-1).nonzero().squeeze(1), mask)
    else:
        layout = PackedRows(s, b, width, None, None, mask)
    ids = torch.cat([split.prefix[0], split.rest_ids[kept]])[None]
    positions = torch.cat([torch.arange(s, device=device), positions[kept]])[None]
    with packed_forward(trunk, layout), last_mlp_from(trunk, read):
        out = trunk(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    rows = out[0, s:] if layout.slot is None else out[0, s:].index_select(0, slot)
    return rows.view(b, width, -1)[:, first:]


def hidden_from(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                share_prefix: bool = True) -> torch.Tensor:
    """The trunk's last hidden states of columns start .. T - 1 of left-padded rows. (B, T) -> (B, T - start, H).

    With `share_prefix`, the leading tokens every row has in common go through the trunk once, in a packed forward
    (packed_hidden) that computes the same function with the same gradients as a full forward at every real column (a
    padding column may get a neighbour's state): a batch of chat prompts under one system prompt skips most of its
    prompt tokens (split_shared_prefix and packable say when it does not apply). The last block's MLP runs only on the
    columns returned (last_mlp_from).
    """
    split = split_shared_prefix(trunk, input_ids, attention_mask, start) if share_prefix else None
    if split is None or not packable(trunk):
        with last_mlp_from(trunk, start):
            return last_hidden(trunk, input_ids, attention_mask)[:, start:]
    return packed_hidden(trunk, split, start - split.left - split.prefix.shape[1])
