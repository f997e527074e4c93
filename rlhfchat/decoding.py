"""The one decoding core: how rlhfchat turns a model's logits into replies, for PPO's rollouts, evaluation and the
chat engine alike.

    settings = GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=0.9, stop_sequences=["### Human:"])
    gen = hf_generate(model, tokenizer, prompt_ids, prompt_mask, settings, seeds=[...])   # transformers' generate
    ids, mask, texts, ended = finish_responses(gen.tokens, tokenizer, settings.stop_sequences, settings.stop_token_ids)
    replies = generate_replies(model, tokenizer, prompts, settings, seeds=[...])          # Reply objects, in order

- Settings: `GenerationSettings` (max/min new tokens, temperature, top-k, top-p, stop texts and end-of-turn tokens;
  `for_template` fills the last two from the chat template: data/chat_format.template_stops).
- The seeded sampler: `warp` applies a repetition penalty, the temperature, top-k and top-p (transformers' order) to
  each row with its own settings; `draw` takes one uniform number per row from the row's own generator and inverts
  the row's CDF (`inverse_cdf_sample`). A seeded row then samples the same tokens alone or in any batch, on any
  number of processes. HF generate runs them as a logits processor (`SeededSampler`); the chat engine calls them
  on its own batched decode step.
- The KV cache: `reserve_cache` gives each layer room for the tokens to come, written in place; `grouped_cache`
  keeps one copy of each prompt's keys for a group of its replies (train/group_cache.py).
- Stops: `cut_at_stop` cuts a text at its first stop sequence; `finish_responses` finds where each reply ends (an
  end-of-turn token, kept, or the first stop text, cut and replaced by EOS as trlX v0.6.0 does) and pads the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhfchat.config import GenerationConfig
from rlhfchat.data.chat_format import STOP_SEQUENCES, Prompt
from rlhfchat.errors import RlhfchatError


@dataclass
class GenerationSettings(GenerationConfig):
    """How replies are drawn: the recipe's generation fields (config.GenerationConfig: max_new_tokens, min_new_tokens,
    top_k, top_p, temperature, stop_sequences, max_prompt_length) and what the code sets at run time. One setting for
    every row of a batch; the chat engine's requests carry their own."""

    stop_sequences: list[str] = field(default_factory=list)
    """Texts that end a reply (cut there; an EOS takes their place). None by default here, unlike a recipe's."""
    do_sample: bool = True
    stop_token_ids: list[int] = field(default_factory=list)
    """End-of-turn tokens besides EOS (ChatML's <|im_end|>): a reply ends at one, which it keeps."""
    share_prefix: bool = True  # the prompt tokens every row shares are prefilled once (trunk.split_shared_prefix)

    @classmethod
    def from_ppo(cls, cfg: Any, tokenizer: Any = None) -> "GenerationSettings":
        gen = cfg.generation
        settings = cls(**dataclasses.asdict(gen), share_prefix=cfg.share_prompt_prefix)
        # a recipe's `stop_sequences: []` asks for no stop texts at all (the fixed-length benchmark does)
        return settings.for_template(tokenizer, texts=bool(gen.stop_sequences)) if tokenizer is not None else settings

    def for_template(self, tokenizer: Any, texts: bool = True) -> "GenerationSettings":
        """These settings with the chat template's end-of-turn tokens added to the stops, and with `texts` its stop
        texts too (data/chat_format.template_stops: EOS, <|im_end|>, Vicuna's "### Human:")."""
        stops = _template_stops(tokenizer)
        if stops is None:
            return self
        eos = tokenizer.eos_token_id
        ids = list(dict.fromkeys([*self.stop_token_ids, *(t for t in stops.token_ids if t != eos)]))
        strings = list(dict.fromkeys([*self.stop_sequences, *(stops.strings if texts else [])]))
        return dataclasses.replace(self, stop_token_ids=ids, stop_sequences=strings)


def _template_stops(tokenizer: Any) -> Any:
    """data/chat_format.template_stops, or None for a template that cannot render a plain two-turn chat (EOS alone
    then ends a reply)."""
    from rlhfchat.data.chat_format import template_stops

    try:
        return template_stops(tokenizer)
    except Exception:
        return None


def end_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a reply under the tokenizer's chat template: EOS and the template's end-of-turn token
    (ChatML's <|im_end|>), as `GenerationSettings.for_template` adds them."""
    stops = _template_stops(tokenizer)
    ids = [tokenizer.eos_token_id, *(stops.token_ids if stops is not None else [])]
    return list(dict.fromkeys(int(t) for t in ids if t is not None))


def penalize_repeats(logits: torch.Tensor, repetition_penalty: Sequence[float] | None, seen: torch.Tensor | None
                     ) -> torch.Tensor:
    """The repetition penalty (CTRL / transformers' definition), one per row, on the tokens `seen` (B, V) bool:
    a seen token's positive score is divided by it, a negative one multiplied. (B, V) -> (B, V); no penalty other
    than 1 leaves the logits as they are."""
    if repetition_penalty is None or all(p == 1.0 for p in repetition_penalty):
        return logits
    pen = torch.tensor(list(repetition_penalty), device=logits.device, dtype=logits.dtype).unsqueeze(1)  # (B, 1)
    return torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)


def warp(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
         repetition_penalty: Sequence[float] | None = None, seen: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's next-token scores as sampling reads them, in transformers' order: repetition penalty (on the tokens
    `seen` (B, V) bool), temperature, top-k, then top-p on what top-k left. logits (B, V) float; one setting per row
    (a temperature of 0 is greedy: treated as 1 here, the caller takes the argmax). Returns (scores, order): scores
    sorted best first with `order` (B, V) mapping them back to token ids when top-k or top-p applied, else the scores
    in token order and None. Each row's best score is shifted to 0 before the temperature divides, so a tiny
    temperature tends to greedy instead of overflowing to NaN."""
    b, v = logits.shape
    dev = logits.device
    x = penalize_repeats(logits, repetition_penalty, seen)
    temp = torch.tensor([t or 1.0 for t in temperature], device=dev, dtype=x.dtype).clamp(min=1e-30).unsqueeze(1)
    x = (x - x.max(dim=-1, keepdim=True).values) / temp  # (B, V), each row's best token at 0
    use_k = any(0 < k < v for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return x, None
    x, order = torch.sort(x, dim=-1, descending=True)  # (B, V), order maps sorted -> token id
    if use_k:
        k = torch.tensor([k if 0 < k < v else v for k in top_k], device=dev).unsqueeze(1)
        x = x.masked_fill(torch.arange(v, device=dev).unsqueeze(0) >= k, float("-inf"))
    if use_p:
        p = torch.tensor(list(top_p), device=dev, dtype=x.dtype).unsqueeze(1)
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs.cumsum(dim=-1) - probs > p, float("-inf"))  # keeps >= 1 token
    return x, order


def draw(scores: torch.Tensor, order: torch.Tensor | None, generators: Sequence[torch.Generator],
         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One token per row of warped `scores` (warp's output): one uniform number from each row's own generator (on the
    CPU, so a seed draws the same numbers on every device), the token where it falls in the row's CDF. -> (B,).

    `dtype`: of the uniform numbers. The chat engine draws float32 ones, as it always has, so that a request's
    `seed` keeps giving the reply it gave before; rollouts and evaluation draw float64 ones."""
    u = torch.cat([torch.rand(1, generator=g, dtype=dtype) for g in generators])
    idx = inverse_cdf_sample(scores, u).unsqueeze(1)  # (B, 1)
    return (order.gather(1, idx) if order is not None else idx).squeeze(1)


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...] = tuple(STOP_SEQUENCES)) -> tuple[str, bool]:
    """Cut a generated reply at the first stop sequence; returns (reply, whether a stop was found)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


def encode_prompt(tokenizer: Any, prompt: Prompt, max_prompt_length: int | None = None) -> list[int]:
    """Token ids of a prompt: messages through the chat template (ending in the assistant cue), a string verbatim.

    Too-long prompts lose their left end, so the assistant cue at the right end survives.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    ids = list(ids)
    if max_prompt_length and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return ids


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, max_len), padded on the left (what generation needs)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _kept_tokens(tokens: list[int], tokenizer: Any, reply: str) -> int:
    """How many leading tokens stay when the decoded text is cut to `reply` (a prefix of it).

    The largest k whose decoded tokens[:k], trailing whitespace aside, is still a prefix of the reply (the cut
    falls on the token boundary at or before where the stop sequence begins; binary search, the test is
    monotone), less any trailing tokens that are only whitespace.
    """
    target = reply.rstrip()
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if target.startswith(tokenizer.decode(tokens[:mid], skip_special_tokens=True).rstrip()):
            lo = mid
        else:
            hi = mid - 1
    while lo > 0 and tokenizer.decode(tokens[: lo - 1], skip_special_tokens=True).rstrip() == target:
        lo -= 1  # trailing whitespace tokens go too: trlX v0.6.0 rstrips the cut text before appending EOS
    return lo


def finish_responses(raw: torch.Tensor, tokenizer: Any, stop_sequences: Sequence[str] = (),
                     stop_token_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Find where each generated response ends; cut at stop sequences; pad the rest.

    raw: (B, R) tokens as generate returned them. A reply ends at its first EOS or end-of-turn token
    (`stop_token_ids`), which it keeps, or else at its first stop sequence, where an EOS replaces the text's first
    token. Returns response_ids (B, R) (pad after the end), response_mask (B, R), the reply texts and `ended` (B,) bool.
    """
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ends = {t for t in (eos_id, *stop_token_ids) if t is not None}
    width = raw.shape[1]
    out = torch.full_like(raw, pad_id)
    mask = torch.zeros_like(raw)
    texts, ended = [], []
    for i, row in enumerate(raw.tolist()):
        # generate fills finished rows with pad; a pad (or an end token) is where the model's own reply ends
        end = next((j for j, t in enumerate(row) if t in ends or t == pad_id), width)
        body = row[:end]
        end_token = row[end] if end < width and row[end] in ends else None
        has_eos = end_token is not None
        text = tokenizer.decode(body, skip_special_tokens=True)
        reply, stopped = cut_at_stop(text, stop_sequences) if stop_sequences else (text, False)
        if stopped:
            keep = _kept_tokens(body, tokenizer, reply)
            body = body[:keep]
            has_eos, end_token = eos_id is not None, None
        if not body and not has_eos:  # nothing at all to score: keep the first token so the score has a place
            body = row[:1]
        tokens = body + ([end_token if end_token is not None else eos_id] if has_eos else [])
        tokens = tokens[:width]
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=raw.dtype)
        mask[i, : len(tokens)] = 1
        texts.append(reply.strip())
        ended.append(has_eos or stopped)
    return out, mask, texts, torch.tensor(ended)


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, R) raw response tokens, R <= max_new_tokens
    hidden: torch.Tensor | None = None  # (B, R, H) the trunk's last hidden state each token was sampled from


class SeededSampler:
    """A logits processor that makes greedy decoding an exact per-row seeded sample.

    Row i's scores are warped (`warp`: temperature, top-k, top-p, the same for every row here) and it draws one uniform
    number from its own generator (seeded with seeds[i], advanced once per step) to take the token where that number
    falls in its CDF (`draw`), so its tokens depend on nothing but that seed and its own logits. The scores it returns
    are 0 at that token and -inf elsewhere, for greedy decoding to pick. One number per row and step: drawing a noise
    value per vocabulary entry instead (the Gumbel-max trick, or torch.multinomial) took 2.4 to 6 ms of a 30 ms CPU
    decode step for 16 rows x 8k tokens. A NaN or all -inf row is an error (inverse_cdf_sample).
    """

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings | None = None):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.settings = settings or GenerationSettings()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, V) -> (B, V) float32: 0 at each row's sampled token, -inf elsewhere."""
        if scores.shape[0] != len(self.seeds):
            raise RlhfchatError(f"seeds: expected one seed per row ({scores.shape[0]}), got {len(self.seeds)}")
        n, s = len(self.seeds), self.settings
        x, order = warp(scores.float(), [s.temperature] * n, [s.top_k] * n, [s.top_p] * n)
        picked = draw(x, order, self.generators)[:, None]
        return torch.full(scores.shape, -torch.inf, device=scores.device).scatter_(1, picked, 0.0)


def _new_cache(model: Any) -> Any:
    """The DynamicCache generate would make for this model, or None where it would make something else."""
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if (getattr(config, "is_encoder_decoder", False) or getattr(base.generation_config, "cache_implementation", None)
            or not getattr(base, "_supports_default_dynamic_cache", lambda: False)()):
        return None
    return DynamicCache(config=config.get_text_config(decoder=True) if hasattr(config, "get_text_config")
                        else config)


def hf_generate(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                settings: GenerationSettings, capture: bool = False,
                seeds: Sequence[int] | None = None) -> Generated:
    """Sample responses with transformers' generate (KV cache). (B, P) -> Generated.

    capture=True also keeps, for every generated position, the trunk's last hidden state (the state that the
    token was sampled from), so PPO gets the old logprobs, the entropy and (shared trunk) the values from the output
    layer and value head alone, without a second pass through the network.

    Sampling always goes through SeededSampler, one generator per row. seeds (one per row): each row's reply is
    then the same whatever batch it is in; without them the seeds are drawn from torch's global (CPU) RNG. The
    settings' temperature, top-k and top-p warp the logits, not the sampling defaults of the model's
    generation_config (min_p, typical_p); its other logits processors (a repetition penalty) still apply, and
    min_new_tokens and EOS (with the settings' end-of-turn tokens) work as without. The KV cache is written in place
    into room reserved for max_new_tokens (reserve_cache).

    settings.share_prefix: the leading prompt tokens all rows share (a system prompt) are prefilled once and their
    KV cache repeated for the rows; generate gets [prefix | each row's left-padded rest] with that cache, and the
    positions it counts from the attention mask are the same as in the plain left-padded layout.

    Rows that come in consecutive groups of one prompt (PPO's samples_per_prompt > 1) generate from a grouped cache
    (train/group_cache.py): each group's prompt is prefilled once and its keys and values are kept once for the
    group's rows; the samples are the plain layout's (up to float rounding). Models the grouped attention does not
    cover (a sliding window, a flash kernel) keep the plain cache.
    """
    from rlhfchat.train.group_cache import group_size, groupable, grouped_attention, grouped_prefill
    from rlhfchat.train.trunk import cache_argument, causal_parts, split_shared_prefix

    ends = [t for t in [tokenizer.eos_token_id, *settings.stop_token_ids] if t is not None]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
        do_sample=settings.do_sample, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=ends if len(ends) > 1 else tokenizer.eos_token_id, use_cache=True,
    )
    if seeds is not None and len(seeds) != prompt_ids.shape[0]:
        raise RlhfchatError(f"seeds: expected one seed per prompt ({prompt_ids.shape[0]}), got {len(seeds)}")
    if settings.do_sample and seeds is None:  # seeds from the global RNG: its state still decides the sample
        seeds = torch.randint(0, 2**62, (prompt_ids.shape[0],)).tolist()
    if settings.do_sample:
        # greedy over the warped logits and one draw per row: an exact sample, from each row's own generator
        kwargs.update(do_sample=False, top_k=None, top_p=None, temperature=None,
                      logits_processor=[SeededSampler(seeds, settings)])
    else:
        kwargs.update(top_k=None, top_p=None, temperature=None)
    if settings.stop_sequences:  # stop each row early; finish_responses does the exact cut
        kwargs.update(stop_strings=list(settings.stop_sequences), tokenizer=tokenizer)
    trunk, _ = causal_parts(model)
    cache_arg = cache_argument(trunk)
    hidden: list[torch.Tensor] = []
    hook = None
    was_training = model.training
    model.eval()
    attention: contextlib.AbstractContextManager = contextlib.nullcontext()
    try:
        with torch.no_grad():
            fresh = _new_cache(model)
            group = group_size(prompt_ids, prompt_mask) if fresh is not None and groupable(trunk, fresh) else 1
            if group > 1:  # each group's prompt prefilled once and its cache kept once (train/group_cache.py)
                rows = prompt_ids.shape[0]
                cache, prompt_ids, prompt_mask = grouped_prefill(trunk, prompt_ids, prompt_mask, group,
                                                                 settings.share_prefix, fresh)
                kwargs[cache_arg] = cache = grouped_cache(cache, rows, settings.max_new_tokens)
                attention = grouped_attention(trunk, cache)
            else:
                split = None
                if settings.share_prefix and cache_arg is not None:
                    split = split_shared_prefix(trunk, prompt_ids, prompt_mask, prompt_ids.shape[1] - 1)
                cache = fresh if cache_arg is not None else None
                if split is not None:
                    cache, prompt_ids, prompt_mask = split.cache(trunk), split.full_ids(), split.full_mask()
                if cache is not None:  # written in place, no copy of the whole cache per generated token
                    kwargs[cache_arg] = reserve_cache(cache, settings.max_new_tokens)
            if capture:
                # one trunk call per generated token (the prefill, then one per step); keep its last position
                hook = trunk.register_forward_hook(lambda module, args, out: hidden.append(out[0][:, -1].detach()))
            with attention:
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    tokens = out[:, prompt_ids.shape[1]:]
    if not capture:
        return Generated(tokens)
    return Generated(tokens, torch.stack(hidden[: tokens.shape[1]], dim=1))


def inverse_cdf_sample(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) logits from one uniform number per row u (B,) in [0, 1): the token where u
    falls in the cumulative distribution of softmax(logits). -inf logits get probability 0 and are never taken.

    The cumulative sum runs in float64 (float32 on MPS, which has none), so a 100k-token vocabulary does not drift.
    A row that is NaN or all -inf is an error, as in torch.multinomial. Returns (B,) token indices.
    """
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    cdf = torch.softmax(logits.float(), dim=-1).to(dtype).cumsum(-1)  # (B, V)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise RlhfchatError("sampling: a row's next-token scores are NaN or all -inf "
                            "(overflow in the model, or the warpers removed every token)")
    # the first token whose cumulative probability exceeds u x total: one with probability > 0 (the target stays
    # below the total even where u x total would round up to it)
    target = torch.minimum(u.reshape(-1).to(dtype).to(logits.device) * total,
                           torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)


@functools.cache
def _reserving_layer() -> type:
    """A transformers DynamicLayer that writes each step's keys and values into room reserved ahead of time.

    The stock layer concatenates every step: each generated token copies the layer's whole cache (for 16 rows of a
    27M-parameter model, a third of a CPU decode step). This one keeps a buffer with room for the tokens still to
    come and returns views of its filled part. A crop leaves its keys a view of the buffer, and the next tokens
    overwrite the cropped ones; when its keys are replaced from outside (a repeat, a reorder, a selection of rows)
    or the room runs out, it starts a new buffer from them. Either way it returns what the stock layer would.

    Decoding only (no_grad or inference mode): the buffer is written in place, which autograd cannot follow.
    """
    from transformers.cache_utils import DynamicLayer

    class ReservingLayer(DynamicLayer):
        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve
            self.room: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = DynamicLayer.get_seq_length(self), key_states.shape[-2]  # its own keys' positions
            room = self.room
            if (room is None or n + new > room[0].shape[-2] or self.keys.data_ptr() != room[0].data_ptr()
                    or self.keys.shape[:2] != room[0].shape[:2] or self.keys.dtype != key_states.dtype):
                b, h, _, d = key_states.shape
                room = (key_states.new_empty(b, h, n + new + self.reserve, d),
                        value_states.new_empty(b, h, n + new + self.reserve, value_states.shape[-1]))
                if n:
                    room[0][:, :, :n] = self.keys
                    room[1][:, :, :n] = self.values
                self.room = room
            room[0][:, :, n : n + new] = key_states
            room[1][:, :, n : n + new] = value_states
            self.keys, self.values = room[0][:, :, : n + new], room[1][:, :, : n + new]
            return self.keys, self.values

    return ReservingLayer


@functools.cache
def _grouped_layer() -> type:
    """A ReservingLayer (above) holding one copy of each group's prompt keys and values besides the rows' own.

    It reports the whole length (prompt + the rows' tokens), so generate counts positions and builds masks as for the
    plain layout, and returns only the rows' own keys and values from `update` (written in place into reserved room,
    decoding only): train/group_cache.py's attention reads the prompt part from the layer.
    """
    from transformers.cache_utils import DynamicLayer

    class GroupedLayer(_reserving_layer()):
        is_croppable = False  # generate's deferred stop check (MPS) would crop after every step

        def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, rows: int, reserve: int):
            super().__init__(reserve)
            self.prompt = (prompt_keys, prompt_values)  # (U, kv heads, P', D)
            self.lazy_initialization(prompt_keys, prompt_values)
            self.keys = prompt_keys.new_empty(rows, prompt_keys.shape[1], 0, prompt_keys.shape[3])
            self.values = prompt_values.new_empty(rows, prompt_values.shape[1], 0, prompt_values.shape[3])

        def get_seq_length(self) -> int:
            return self.prompt[0].shape[-2] + DynamicLayer.get_seq_length(self)

        def _unsupported(self, *args: Any, **kwargs: Any) -> None:
            raise RlhfchatError("a grouped prompt cache serves sampling and greedy decoding only "
                                "(no beam search, assisted decoding or cache edits)")

        crop = batch_repeat_interleave = batch_select_indices = reorder_cache = reset = _unsupported

    return GroupedLayer


def grouped_cache(cache: Any, rows: int, reserve: int) -> Any:
    """A dynamic cache filled on one row per group of prompts, made the cache of `rows` rows in those groups: each
    layer's keys and values become a GroupedLayer's prompt part (train/group_cache.py), with room for `reserve` more
    positions on every row. Returns the cache."""
    layer_class = _grouped_layer()
    cache.layers = [layer_class(layer.keys, layer.values, rows, reserve) for layer in cache.layers]
    return cache


def reserve_cache(cache: Any, tokens: int) -> Any:
    """Give each plain dynamic layer of a HF cache room for `tokens` more positions (see _reserving_layer).

    Layers of other kinds (sliding window, static, quantized) stay as they are. Returns the cache. For decoding
    under no_grad or inference mode only.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # an older transformers without per-layer caches
        return cache
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return cache
    layer_class = _reserving_layer()
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            reserving = layer_class(tokens)
            if layer.is_initialized:
                reserving.lazy_initialization(layer.keys, layer.values)
                reserving.keys, reserving.values = layer.keys, layer.values
            layers[i] = reserving
    return cache


# --------------------------------------------------------------------------------------------------------------
# Replies to prompts, in order: what evaluation (and PPO's held-out figures) read


@dataclass
class Reply:
    text: str
    """The reply as a user sees it: cut at the first stop sequence, special tokens and outer spaces removed."""
    n_tokens: int
    """Tokens of the reply before its end (an end token, or the EOS put in a stop sequence's place, not counted)."""
    stopped: bool
    """Ended by EOS, an end-of-turn token or a stop sequence (False: ran into max_new_tokens)."""
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The reply's tokens up to and including its end token (what PPO would train on, and log-probs read)."""
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    """The prompt's token ids as the model saw them (left-truncated to max_prompt_length)."""


def generate_replies(model: Any, tokenizer: Any, prompts: Sequence[Prompt], settings: GenerationSettings, *,
                     batch_size: int = 16, max_prompt_length: int | None = None, seeds: Sequence[int] | None = None,
                     desc: str | None = None) -> list[Reply]:
    """One reply per prompt (chat messages or a verbatim string), in order, through hf_generate and
    finish_responses. Greedy when `settings.do_sample` is false; else sampled, and with `seeds` (one per prompt)
    each reply depends only on its prompt and its seed, not on its batch. `desc`: a progress bar's label."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: list[Reply] = []
    starts = range(0, len(prompts), max(1, batch_size))
    for start in tqdm(starts, desc=desc, total=len(starts), leave=False, disable=desc is None):
        ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts[start : start + batch_size]]
        batch_seeds = None if seeds is None else list(seeds[start : start + batch_size])
        prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id, device)
        gen = hf_generate(model, tokenizer, prompt_ids, prompt_mask, settings, seeds=batch_seeds)
        response, mask, texts, ended = finish_responses(gen.tokens, tokenizer, settings.stop_sequences,
                                                        settings.stop_token_ids)
        for p, tokens, m, text, stop in zip(ids, response.tolist(), mask.tolist(), texts, ended.tolist()):
            kept = tokens[: sum(m)]
            n = len(kept) - (1 if stop and kept else 0)
            out.append(Reply(text=text, n_tokens=n, stopped=bool(stop), token_ids=kept, prompt_ids=list(p)))
    return out
