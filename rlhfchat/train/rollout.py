"""Rollouts: prompts in, left-padded prompt tensors and cut, right-padded response tensors out.

    settings = GenerationSettings.from_ppo(recipe.ppo)
    prompt_ids = [encode_prompt(tokenizer, p, 256) for p in prompts]        # chat messages or a verbatim string
    rollout = generate_rollout(model, tokenizer, prompt_ids, settings)      # Rollout: (B, P) and (B, R) tensors

    generate_replies(model, tokenizer, prompts, settings)                   # list[str], for evaluation and chat

A response ends at the first EOS (kept, it is a real token the policy chose) or, failing that, at the first stop
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

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhfchat.data.chat_format import Prompt, cut_at_stop
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import inverse_cdf_sample, reserve_cache


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = True
    stop_sequences: list[str] = field(default_factory=list)
    share_prefix: bool = True  # the prompt tokens every row shares are prefilled once (trunk.split_shared_prefix)

    @classmethod
    def from_ppo(cls, cfg: Any) -> "GenerationSettings":
        gen = cfg.generation
        return cls(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, top_k=gen.top_k,
                   top_p=gen.top_p, temperature=gen.temperature, stop_sequences=list(gen.stop_sequences),
                   share_prefix=cfg.share_prompt_prefix)


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


def finish_responses(raw: torch.Tensor, tokenizer: Any, stop_sequences: Sequence[str] = ()
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Find where each generated response ends; cut at stop sequences; pad the rest.

    raw: (B, R) tokens as generate returned them. Returns response_ids (B, R) (an EOS replaces the first token of
    a stop sequence; pad after the end), response_mask (B, R), the reply texts and `ended` (B,) bool.
    """
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = raw.shape[1]
    out = torch.full_like(raw, pad_id)
    mask = torch.zeros_like(raw)
    texts, ended = [], []
    for i, row in enumerate(raw.tolist()):
        # generate fills finished rows with pad; a pad (or EOS) is where the model's own reply ends
        end = next((j for j, t in enumerate(row) if t == eos_id or t == pad_id), width)
        body = row[:end]
        has_eos = end < width and row[end] == eos_id
        text = tokenizer.decode(body, skip_special_tokens=True)
        reply, stopped = cut_at_stop(text, stop_sequences) if stop_sequences else (text, False)
        if stopped:
            keep = _kept_tokens(body, tokenizer, reply)
            body = body[:keep]
            has_eos = eos_id is not None
        if not body and not has_eos:  # nothing at all to score: keep the first token so the score has a place
            body = row[:1]
        tokens = body + ([eos_id] if has_eos else [])
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

    Row i draws one uniform number u from its own generator (seeded with seeds[i], advanced once per step) and takes
    the token where u falls in the cumulative distribution of softmax(scores) (inverse-CDF sampling), so its tokens
    depend on nothing but that seed and its own logits. The scores it returns are 0 at that token and -inf elsewhere,
    for greedy decoding to pick. Put it after the temperature / top-k / top-p warpers (their -inf gets probability
    0 and is never taken). One number per row and step: drawing a noise value per vocabulary entry instead (the
    Gumbel-max trick, or torch.multinomial) took 2.4 to 6 ms of a 30 ms CPU decode step for 16 rows x 8k tokens.

    The generators live on the CPU and the numbers go to the scores' device in one copy per step, so a seed draws
    the same numbers on every device. The pick is models.inverse_cdf_sample (a NaN or all -inf row is an error).
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, V) -> (B, V) float32: 0 at each row's sampled token, -inf elsewhere."""
        if scores.shape[0] != len(self.seeds):
            raise RlhfchatError(f"seeds: expected one seed per row ({scores.shape[0]}), got {len(self.seeds)}")
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        picked = inverse_cdf_sample(scores, u)[:, None]
        device = scores.device
        return torch.full(scores.shape, -torch.inf, device=device).scatter_(1, picked, 0.0)


def seeded_processors(settings: GenerationSettings, seeds: Sequence[int]) -> list[Any]:
    """The warpers generate's sampling would apply (same order: temperature, top-k, top-p), then the sampler."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if settings.temperature != 1.0:
        out.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        out.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        out.append(TopPLogitsWarper(settings.top_p))
    return [*out, SeededSampler(seeds)]


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
    min_new_tokens and EOS work as without. The KV cache is written in place into room reserved for max_new_tokens
    (models.reserve_cache).

    settings.share_prefix: the leading prompt tokens all rows share (a system prompt) are prefilled once and their
    KV cache repeated for the rows; generate gets [prefix | each row's left-padded rest] with that cache, and the
    positions it counts from the attention mask are the same as in the plain left-padded layout.
    """
    from rlhfchat.train.policy import causal_parts
    from rlhfchat.train.trunk import cache_argument, split_shared_prefix

    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
        do_sample=settings.do_sample, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if seeds is not None and len(seeds) != prompt_ids.shape[0]:
        raise RlhfchatError(f"seeds: expected one seed per prompt ({prompt_ids.shape[0]}), got {len(seeds)}")
    if settings.do_sample and seeds is None:  # seeds from the global RNG: its state still decides the sample
        seeds = torch.randint(0, 2**62, (prompt_ids.shape[0],)).tolist()
    if settings.do_sample:
        # greedy over the warped logits and one draw per row: an exact sample, from each row's own generator
        kwargs.update(do_sample=False, top_k=None, top_p=None, temperature=None,
                      logits_processor=seeded_processors(settings, seeds))
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
    try:
        with torch.no_grad():
            split = None
            if settings.share_prefix and cache_arg is not None:
                split = split_shared_prefix(trunk, prompt_ids, prompt_mask, prompt_ids.shape[1] - 1)
            cache = None
            if split is not None:
                cache = split.cache(trunk)
                prompt_ids = torch.cat([split.prefix.expand(split.rest_ids.shape[0], -1), split.rest_ids], 1)
                prompt_mask = split.full_mask()
            elif cache_arg is not None:
                cache = _new_cache(model)
            if cache is not None:  # written in place, no copy of the whole cache per generated token
                kwargs[cache_arg] = reserve_cache(cache, settings.max_new_tokens)
            if capture:
                # one trunk call per generated token (the prefill, then one per step); keep its last position
                hook = trunk.register_forward_hook(lambda module, args, out: hidden.append(out[0][:, -1].detach()))
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    tokens = out[:, prompt_ids.shape[1]:]
    if not capture:
        return Generated(tokens)
    return Generated(tokens, torch.stack(hidden[: tokens.shape[1]], dim=1))


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
    response_ids, response_mask, texts, ended = finish_responses(gen.tokens, tokenizer, settings.stop_sequences)
    return Rollout(ids, mask, response_ids, response_mask, texts, ended, gen.hidden)


def generate_replies(model: Any, tokenizer: Any, prompts: Sequence[Prompt], settings: GenerationSettings,
                     batch_size: int = 16, max_prompt_length: int | None = None,
                     seeds: Sequence[int] | None = None) -> list[str]:
    """Replies to prompts (chat messages or verbatim strings), cut at stop sequences, in order.

    seeds: one per prompt, as for generate_rollout (each reply then does not depend on the batch it is in)."""
    device = next(model.parameters()).device
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts[start : start + batch_size]]
        batch_seeds = None if seeds is None else seeds[start : start + batch_size]
        replies.extend(generate_rollout(model, tokenizer, batch, settings, device=device, seeds=batch_seeds).texts)
    return replies
