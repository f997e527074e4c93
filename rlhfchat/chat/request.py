"""What one generation request is, for every chat backend (engine.py's HF batcher, engine_vllm.py's vLLM):
its sampling settings, the handle a caller iterates for streamed text, the finished Completion, the message checks,
the stop-sequence hold-back that keeps "### Human:" out of every stream, and `EngineCalls`, the base both engines
share: the prompt that fits the context window (fit/encode/render, `chars_per_token_bound`) and stream/generate.

    req = engine.submit(messages, SamplingParams(temperature=0.7))
    for piece in req: ...            # or `async for piece in req`; leaving the loop early cancels the request
    req.result().text                # the whole reply
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from rlhfchat.data.chat_format import STOP_SEQUENCES
from rlhfchat.errors import RlhfchatError

DEFAULT_MAX_NEW_TOKENS = 512
"""The reply length when a request does not say (and the context window leaves room)."""


class EngineBusy(RlhfchatError):
    """The engine's waiting queue is full: try again later (HTTP 429)."""


class PromptTooLong(RlhfchatError):
    """The prompt (plus the requested reply length) does not fit the model's context window (HTTP 400)."""


class EngineClosed(RlhfchatError):
    """The engine is shutting down and takes no more requests (HTTP 503)."""


class GenerationFailed(RlhfchatError):
    """The backend failed while generating this reply (out of memory, a NaN in the model): not the caller's fault
    (HTTP 503, or an error event in a stream that has started)."""


SEED_RANGE = (-2**63, 2**64 - 1)
"""The seeds torch.Generator.manual_seed takes (a negative seed wraps around modulo 2^64)."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Past these, every seen token is banned or forced (and float32 logits overflow): surely a mistake."""
MAX_TEMPERATURE = 100.0


def _number(x: Any, lo: float, hi: float, *, lo_open: bool = False) -> bool:
    """A real int or float (not a bool, not NaN) in [lo, hi] (or (lo, hi] with lo_open)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return (lo < x if lo_open else lo <= x) and x <= hi


def check_text(where: str, text: str) -> str:
    """`text` if it is valid Unicode (it can be encoded as UTF-8: no lone surrogate such as "\\ud800", which JSON
    escapes can carry and tokenizers reject)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RlhfchatError(f"{where}: not valid Unicode (a lone surrogate {text[e.start]!r} at character "
                            f"{e.start})") from None
    return text


@dataclass
class SamplingParams:
    """How one reply is sampled. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    """None: up to DEFAULT_MAX_NEW_TOKENS, or what the context window leaves."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or the reply (the CTRL / HF definition)."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Extra stop sequences, on top of the template's."""
    ignore_eos: bool = False
    """Benchmarks: ignore EOS and stop sequences, always generate max_new_tokens."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> "SamplingParams":
        """Raise RlhfchatError naming the first setting a backend could not sample with; the engines call this
        again when a request is submitted, so that a bad value fails its own request before it joins a batch, and
        never the batch."""
        seed_lo, seed_hi = SEED_RANGE
        pen_lo, pen_hi = REPETITION_PENALTY_RANGE
        checks = (
            ("temperature", _number(self.temperature, 0, MAX_TEMPERATURE), f"a number in [0, {MAX_TEMPERATURE:g}]"),
            ("top_p", _number(self.top_p, 0, 1, lo_open=True), "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "an integer >= 0"),
            ("max_new_tokens", self.max_new_tokens is None or (isinstance(self.max_new_tokens, int)
                                                               and not isinstance(self.max_new_tokens, bool)
                                                               and self.max_new_tokens >= 1), "an integer >= 1"),
            ("repetition_penalty", _number(self.repetition_penalty, pen_lo, pen_hi),
             f"a number in [{pen_lo:g}, {pen_hi:g}]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                           and seed_lo <= self.seed <= seed_hi),
             "an integer from -2**63 to 2**64 - 1"),
            ("stop", isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise RlhfchatError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        self.stop = [check_text(f"stop[{i}]", s) for i, s in enumerate(self.stop)]
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Completion:
    """A finished reply. finish_reason: "stop" (EOS or a stop sequence), "length", "cancelled"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    messages: list[dict[str, str]]
    """The prompt the model saw: the request's messages less any oldest turns dropped to fit the context."""
    model: str
    params: SamplingParams
    ttft_s: float | None = None
    """Seconds from submission to the first generated token."""
    elapsed_s: float = 0.0


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages the template can render: system (first only), then user/assistant, ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise RlhfchatError("messages: expected a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RlhfchatError(f"messages[{i}]: expected {{'role': ..., 'content': str}}, got {m!r}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise RlhfchatError(f"messages[{i}].role: expected system, user or assistant, got {m.get('role')!r}")
        if m["role"] == "system" and i != 0:
            raise RlhfchatError(f"messages[{i}].role: a system message may only come first")
        check_text(f"messages[{i}].content", m["content"])
    if messages[-1]["role"] != "user":
        raise RlhfchatError(f"messages[{len(messages) - 1}].role: the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def stream_safe(text: str, stops: list[str]) -> str:
    """The part of a growing reply that can be shown now: hold back a trailing incomplete UTF-8 character, any
    suffix that could be the start of a stop sequence, and trailing whitespace (so "### Human:" never leaks, even in
    part, and the streamed pieces add up to the final reply)."""
    text = text.rstrip("\ufffd")
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return text[:end].rstrip()


class Request:
    """One submitted reply: iterate it (sync or async) for text pieces; closing the iterator cancels it."""

    def __init__(self, messages: list[dict[str, str]], params: SamplingParams, prompt_ids: list[int], model: str,
                 max_new_tokens: int):
        self.messages = messages
        self.params = params
        self.prompt_ids = prompt_ids
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._done = False
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._wakers: list[Any] = []
        self.backend_state: Any = None
        """What the backend keeps for this request from submission on (the HF engine: its seeded generator)."""

    # --- called by the backend ---
    def _push(self, piece: str = "", completion: Completion | None = None, error: BaseException | None = None):
        with self._cond:
            if piece:
                self._pieces.append(piece)
            if completion is not None or error is not None:
                self._completion, self._error, self._done = completion, error, True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _finish(self, text: str, reason: str, completion_tokens: int) -> None:
        now = time.perf_counter()
        self._push(completion=Completion(
            text=text, finish_reason=reason, prompt_tokens=len(self.prompt_ids), completion_tokens=completion_tokens,
            messages=self.messages, model=self.model, params=self.params,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.created,
            elapsed_s=now - self.created))

    # --- called by the consumer ---
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop generating; the reply so far is the result, with finish_reason "cancelled"."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole reply."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError("the reply did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    @property
    def completion(self) -> Completion | None:
        return self._completion

    def __iter__(self) -> Iterator[str]:
        i, finished = 0, False
        try:
            while True:
                with self._cond:
                    # a timeout so that Ctrl-C reaches the waiting thread
                    while i == len(self._pieces) and not self._done:
                        self._cond.wait(0.1)
                    new, done = self._pieces[i:], self._done
                    i += len(new)
                yield from new
                if done:
                    finished = True
                    break
        finally:
            if not finished:
                self.cancel()
        if self._error is not None:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        with self._cond:
            self._wakers.append(wake)
        i, finished = 0, False
        try:
            while True:
                event.clear()
                with self._cond:
                    new, done = self._pieces[i:], self._done
                    i += len(new)
                for piece in new:
                    yield piece
                if done:
                    finished = True
                    break
                await event.wait()
        finally:
            if not finished:
                self.cancel()
        if self._error is not None:
            raise self._error


def stop_sequences(params: SamplingParams) -> list[str]:
    return [] if params.ignore_eos else list(dict.fromkeys([*STOP_SEQUENCES, *params.stop]))


class EngineCalls:
    """What both engines (HF and vLLM) share: the prompt that fits the context window (`fit`, `encode`, `render`,
    from the engine's `tokenizer`, `context_window`, `chars_per_token` and `name`), and on top of their own `submit`:
    streaming, one reply, many replies."""

    name: str
    tokenizer: Any
    context_window: int
    chars_per_token: int | None

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int | None = None,
            truncate: bool = True) -> tuple[list[dict[str, str]], list[int], int]:
        """The prompt that fits the context window: (messages used, prompt token ids, reply token budget).

        truncate=True keeps the system prompt and the last user message and drops the oldest turns until the prompt
        plus the reply length fits (or only the last exchange is left); truncate=False (the API) never drops
        anything and raises PromptTooLong instead."""
        messages = check_messages(messages)
        system, turns = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
        want = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        ids = self.encode(system + turns, limit=self.context_window)
        while truncate and (ids is None or len(ids) + want > self.context_window) and len(turns) > 1:
            turns = turns[1:]
            while turns[0]["role"] != "user":  # a kept conversation starts with the user
                turns = turns[1:]
            ids = self.encode(system + turns, limit=self.context_window)
        if ids is None:
            raise PromptTooLong(f"messages: the prompt is more than {self.context_window} tokens (it is "
                                f"{len(self.render(system + turns))} characters); {self.name} takes at most "
                                f"{self.context_window} tokens in all")
        room = self.context_window - len(ids)
        if room < 1 or (not truncate and max_new_tokens is not None and max_new_tokens > room):
            asked = f" plus max_tokens {max_new_tokens}" if max_new_tokens and not truncate else ""
            raise PromptTooLong(f"messages: the prompt is {len(ids)} tokens{asked}; {self.name} takes at most "
                                f"{self.context_window} tokens in all")
        return system + turns, ids, min(want, room)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The messages through the chat template, ending with the assistant's cue."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, messages: list[dict[str, str]], limit: int | None = None) -> list[int] | None:
        """Token ids of the rendered messages; None, without tokenizing, when `limit` is given and the text is
        certainly longer than `limit` tokens (`chars_per_token`): a megabyte prompt then costs a character count,
        not seconds of tokenizer time and a hundred megabytes."""
        text = self.render(messages)
        if limit is not None and self.chars_per_token and len(text) > limit * self.chars_per_token:
            return None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kw: Any) -> Request:
        raise NotImplementedError

    def stream(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kw: Any) -> Iterator[str]:
        """Text pieces of one reply as they are generated."""
        return iter(self.submit(messages, params, **kw))

    def generate(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kw: Any) -> Completion:
        return self.submit(messages, params, **kw).result()

    def generate_many(self, conversations: list[list[dict[str, str]]],
                      params: SamplingParams | None = None) -> list[Completion]:
        """Replies to many prompts (e.g. evaluation), decoded in batches; results in input order."""
        reqs = [self.submit(m, params, block=True) for m in conversations]
        return [r.result() for r in reqs]


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    """The sampling flags every front end takes (chat, discord); `sampling_params(args)` reads them back."""
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 picks the likeliest token (greedy) (default 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: the smallest set of tokens holding this much probability (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens in a reply (default {max_new_tokens})")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1, tokens already in the text are less likely (CTRL's penalty; default 1.0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampling, for the same reply again (default: a new one each time)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def chars_per_token_bound(tokenizer: Any) -> int | None:
    """At most how many characters of text one token covers, where the tokenizer makes it certain; else None.

    Byte-level BPE (GPT-2, Llama 3, Qwen) and byte-fallback BPE (Llama 2, Mistral) with every byte in the vocabulary
    never drop a character: each is at least one byte, and a token covers at most the bytes of the longest
    vocabulary entry. Normalizers that only add or keep characters are fine; a Unicode normal form may merge up to
    three characters into one (Hangul jamo), hence a factor 4 then. Anything else (a normalizer or pre-tokenizer
    that can delete characters, an unknown token) gives None, and every prompt is tokenized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers.pre_tokenizers import ByteLevel

    cfg = json.loads(backend.to_str())
    model = cfg.get("model") or {}
    vocab = tokenizer.get_vocab()
    pre = _parts(cfg.get("pre_tokenizer"))
    if any(p.get("type") not in ("ByteLevel", "Metaspace", "Digits", "Punctuation", "Split")
           or p.get("behavior") == "Removed" for p in pre) or model.get("type") != "BPE":
        return None
    if any(p.get("type") == "ByteLevel" for p in pre):
        complete = all(c in vocab for c in ByteLevel.alphabet())
    else:
        complete = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))
    factor = 1
    for n in _parts(cfg.get("normalizer")):
        kind = n.get("type")
        if kind in ("NFC", "NFKC", "NFD", "NFKD"):
            factor = 4
        elif kind == "Replace" and isinstance(n.get("pattern"), dict) and "String" in n["pattern"]:
            complete = complete and len(n.get("content", "")) >= len(n["pattern"]["String"])
        elif kind not in ("Prepend", "Lowercase"):
            return None
    longest = max((len(t) for t in vocab), default=0)
    return factor * longest if complete and longest else None


def _parts(component: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer or pre-tokenizer as its list of steps (a Sequence flattened)."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        steps = component.get("normalizers") or component.get("pretokenizers") or []
        return [p for step in steps for p in _parts(step)]
    return [component]
