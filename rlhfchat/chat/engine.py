"""Streaming chat generation for every front end (web, API, terminal, Discord, evaluation).

    from rlhfchat.chat.engine import load_engine, SamplingParams
    engine = load_engine("runs/tiny/ppo")                       # any HF causal-LM folder, or a LoRA adapter folder
    for piece in engine.stream([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.7)):
        print(piece, end="", flush=True)
    engine.generate(messages).text                              # the whole reply
    engine.generate_many([messages, ...])                       # many prompts, batched, in order
    req = engine.submit(messages, params)                       # a handle: iterate it (sync or async),
                                                                # .cancel(), .result()

One worker thread per engine decodes every running request together, step by step, with one KV cache
(continuous batching): a request that arrives while others are decoding is prefilled on its own, its cache is
left-padded to the batch's length and joined to the batch at the next step; a finished request leaves the batch at
once. Rows are left-padded, with an attention mask and per-row position ids, so a request decodes the same text
alone or in a batch. At most `max_batch` requests decode together; up to `max_queue` more wait, and past that
`submit` raises `EngineBusy` (the API answers 429).

Isolation: every per-request setting is checked, and the request's random generator seeded, in `submit`, before the
request can join a batch; a failure that belongs to one request (its prefill, NaN scores in its row) fails that
request alone, and only a failed decoding step of the whole batch fails every running request.

Sampling is the decoding core's (rlhfchat/decoding.py: `penalize_repeats`, `warp`, `draw`), as in PPO's rollouts
and evaluation. Stop handling: a reply ends at EOS, at the chat template's end-of-turn token (decoding.end_token_ids:
ChatML's <|im_end|>) or at a stop sequence ("### Human:"); while streaming, text
that could be the start of a stop sequence (and trailing whitespace) is held back, so no part of it ever leaks.

With vLLM installed and a CUDA GPU present, `load_engine` returns the vLLM backend (engine_vllm.py) instead, with
the same methods.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhfchat.chat.request import (  # noqa: F401  (re-exported: callers import everything from engine)
    DEFAULT_MAX_NEW_TOKENS, Completion, EngineBusy, EngineCalls, EngineClosed, GenerationFailed, PromptTooLong, Request,
    SamplingParams, chars_per_token_bound, check_messages, stop_sequences, stream_safe,
)
from rlhfchat.decoding import cut_at_stop, draw, end_token_ids, penalize_repeats, warp
from rlhfchat.errors import RlhfchatError

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """A request in the running batch (worker-thread state)."""

    req: Request
    generator: Any  # torch.Generator
    seen: Any  # (V,) bool: tokens of the prompt and the reply, for the repetition penalty
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0
    shown: str = ""


class ChatEngine(EngineCalls):
    """A Hugging Face causal LM behind a continuous-batching worker thread (see the module docstring)."""

    backend = "hf"

    def __init__(self, model_dir: str | Path, *, name: str | None = None, max_batch: int = 8, max_queue: int = 64,
                 device: str | None = None, dtype: str | None = None, threads: int | None = None):
        import torch

        from rlhfchat.models import load_tokenizer, resolve_model

        self.model_dir = Path(model_dir)
        source = resolve_model(model_dir)  # a folder; or a hub id: the id online, its cached copy offline
        if Path(source).is_dir() and not any((Path(source) / f).is_file()
                                             for f in ("config.json", "adapter_config.json")):
            raise RlhfchatError(f"{model_dir}: not a model folder (no config.json or adapter_config.json)")
        self.name = name or self.model_dir.name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch_dtype = getattr(torch, dtype) if dtype else default_dtype
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)  # process-wide: the commands pass server_threads()
        self.model, tok_dir = _load_model(source, torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = load_tokenizer(tok_dir)
        self.chars_per_token = chars_per_token_bound(self.tokenizer)
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        window = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        self.context_window = int(min(window, tok_max) if tok_max and tok_max < 1_000_000 else window)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        # EOS (the model's and the tokenizer's) and the chat template's end-of-turn token (ChatML's <|im_end|>)
        self.eos_ids = {int(e) for e in [*eos, *end_token_ids(self.tokenizer)] if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_position_ids = "position_ids" in params
        self._has_logits_to_keep = "logits_to_keep" in params

        self._cond = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._closed = False
        self._running = 0
        # batch state, touched only by the worker thread
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # (B, T) 1 for real tokens, 0 for left padding
        self._pos: Any = None  # (B,) position id of the next token each row feeds
        self._next: Any = None  # (B,) the token each row feeds next
        self._worker = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API
    def submit(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *, truncate: bool = True,
               block: bool = False) -> Request:
        """Queue one reply. Raises PromptTooLong, RlhfchatError (bad messages or settings), EngineBusy (queue full;
        with block=True it waits for room instead), EngineClosed. CPU work (the tokenizer): call it off an event
        loop."""
        import torch

        params = (params or SamplingParams()).check()
        used, ids, budget = self.fit(messages, params.max_new_tokens, truncate)
        req = Request(used, params, ids, self.name, budget)
        gen = torch.Generator()  # on the CPU (decoding.draw): a seed draws the same numbers on every device
        try:  # here, not in the batched step: a seed torch refuses fails this request alone
            gen.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            raise RlhfchatError(f"seed: {params.seed!r} is not a seed torch takes ({e})") from None
        req.backend_state = gen
        with self._cond:
            if self._closed:
                raise EngineClosed(f"{self.name}: the engine is closed")
            if len(self._pending) >= self.max_queue:
                if not block:
                    raise EngineBusy(f"{self.name}: busy ({self.max_queue} requests waiting); try again shortly")
                self._cond.wait_for(lambda: len(self._pending) < self.max_queue or self._closed)
            self._pending.append(req)
            self._cond.notify_all()
        return req

    def load(self) -> dict[str, int]:
        """How busy the engine is: requests decoding and waiting."""
        with self._cond:
            return {"running": self._running, "waiting": len(self._pending)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                new = []
                while self._pending and len(self._rows) + len(new) < self.max_batch:
                    new.append(self._pending.popleft())
                self._running = len(self._rows) + len(new)
                self._cond.notify_all()  # room in the queue for blocked submitters
            with torch.inference_mode():
                for req in [r for r in new if r.cancelled]:
                    req._finish("", "cancelled", 0)
                new = [r for r in new if not r.cancelled]
                if new:
                    self._admit(new)
                if self._rows:
                    try:
                        self._decode()
                    except Exception as e:  # no telling which row is at fault: the running rows fail, not the engine
                        self._fail([r.req for r in self._rows], e)
                        self._rows, self._cache = [], None
            with self._cond:
                self._running = len(self._rows)
        err = EngineClosed(f"{self.name}: the engine is closed")
        for req in [*(r.req for r in self._rows), *self._pending]:
            req._push(error=err)

    def _fail(self, reqs: list[Request], e: BaseException) -> None:
        log.error("generation failed for %d request(s)", len(reqs), exc_info=e)
        err = e if isinstance(e, GenerationFailed) else GenerationFailed(
            f"{self.name}: generation failed ({type(e).__name__}: {e})")
        for req in reqs:
            if not req.done:
                req._push(error=err)

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill new requests and join them to the running batch. The batch is untouched until the join, so a
        failure here fails these requests only; when several fail before any of them streamed a token, each is
        tried alone, so that only the one at fault fails."""
        try:
            self._prefill(reqs)
        except Exception as e:
            if len(reqs) > 1 and all(r.first_token_at is None for r in reqs):
                for r in reqs:
                    self._admit([r])
            else:
                self._fail(reqs, e)

    def _forward(self, input_ids: Any, mask: Any, pos: Any, cache: Any) -> tuple[Any, Any]:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, self._cache_kw: cache, "use_cache": True}
        if self._has_position_ids:
            kw["position_ids"] = pos
        if self._has_logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.model(**kw)
        return out.logits[:, -1, :].float(), getattr(out, self._cache_kw)

    def _prefill(self, reqs: list[Request]) -> None:
        """Run the new prompts together (left-padded), sample their first tokens, join them to the batch."""
        import torch
        from transformers import DynamicCache

        n, length = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, length - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L): each row counts from 0 at its first real token
        logits, cache = self._forward(ids, mask, pos, DynamicCache())
        rows = []
        for r in reqs:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor([t for t in r.prompt_ids if t < self.vocab_size], dtype=torch.long,
                              device=self.device)] = True
            rows.append(_Row(r, r.backend_state, seen, stop_sequences(r.params)))  # the generator seeded in submit
        tokens = self._sample(logits, rows)
        keep = [i for i, (row, t) in enumerate(zip(rows, tokens)) if not self._settle(row, t)]
        if not keep:
            return
        idx = torch.tensor(keep, device=self.device)
        kv = [(k[idx], v[idx]) for k, v in _layers(cache)]
        mask = mask[idx]
        pos = torch.tensor([len(rows[i].req.prompt_ids) for i in keep], device=self.device)
        nxt = torch.tensor([tokens[i] for i in keep], device=self.device)
        self._join(kv, mask, pos, nxt, [rows[i] for i in keep])

    def _join(self, kv: list[tuple[Any, Any]], mask: Any, pos: Any, nxt: Any, rows: list[_Row]) -> None:
        """Append rows to the running batch, left-padding whichever cache is shorter."""
        import torch
        import torch.nn.functional as F

        if not self._rows:
            self._cache, self._mask, self._pos, self._next, self._rows = _decode_cache(kv), mask, pos, nxt, rows
            return
        old = list(_layers(self._cache))
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)

        def pad(x: Any, have: int) -> Any:  # (B, H, T, D): pad T on the left with zeros
            return F.pad(x, (0, 0, t - have, 0)) if have < t else x

        merged = [(torch.cat([pad(k0, t_old), pad(k1, t_new)]), torch.cat([pad(v0, t_old), pad(v1, t_new)]))
                  for (k0, v0), (k1, v1) in zip(old, kv)]
        # all or nothing: if anything above fails (out of memory), the running batch is as it was
        self._cache, self._mask, self._pos, self._next, self._rows = (
            _decode_cache(merged), torch.cat([F.pad(self._mask, (t - t_old, 0)), F.pad(mask, (t - t_new, 0))]),
            torch.cat([self._pos, pos]), torch.cat([self._next, nxt]), self._rows + rows)

    def _decode(self) -> None:
        """One token for every running row; finished and cancelled rows leave the batch."""
        import torch

        b = len(self._rows)
        self._mask = torch.cat([self._mask, torch.ones((b, 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        logits, self._cache = self._forward(self._next.view(b, 1), self._mask, self._pos.view(b, 1), self._cache)
        self._pos = self._pos + 1
        tokens = self._sample(logits, self._rows)
        keep = [i for i, (row, t) in enumerate(zip(self._rows, tokens)) if not self._settle(row, t)]
        if len(keep) == b:
            self._next = torch.tensor(tokens, device=self.device)
            return
        with self._cond:
            self._running = len(keep)
        if not keep:
            self._rows, self._cache = [], None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        start = int(mask.any(dim=0).long().argmax())  # columns that are padding in every remaining row go
        self._cache = _decode_cache([(k[idx, :, start:], v[idx, :, start:]) for k, v in _layers(self._cache)])
        self._mask = mask[:, start:]
        self._pos = self._pos[idx]
        self._next = torch.tensor([tokens[i] for i in keep], device=self.device)
        self._rows = [self._rows[i] for i in keep]

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int | None]:
        """One token per row from (B, V) float logits, each row with its own settings and random generator; None
        for a row whose scores are NaN or +inf (or all -inf): that row fails alone (`_settle`).

        The decoding core's sampler (rlhfchat/decoding.py), as PPO's rollouts and evaluation use it: the repetition
        penalty (`penalize_repeats`), then `warp` (temperature, top-k, top-p, in transformers' order, one setting
        per row) and `draw` (one uniform number from the row's own CPU generator, inverted through the row's CDF),
        so a seeded request samples the same way alone or in a batch. Temperature 0 takes the penalized argmax."""
        import torch

        bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)  # (B,)
        if bool(bad.any()):
            good = [i for i, b in enumerate(bad.tolist()) if not b]
            out: list[int | None] = [None] * len(rows)
            if good:
                for i, t in zip(good, self._sample(logits[good], [rows[i] for i in good])):
                    out[i] = t
            return out
        params = [r.req.params for r in rows]
        x = self._penalized(logits, rows)
        greedy = x.argmax(dim=-1)  # (B,)
        if all(p.temperature == 0 for p in params):
            return greedy.tolist()
        scores, order = warp(x, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params])
        sampled = draw(scores, order, [r.generator for r in rows], dtype=torch.float32)  # (see draw)
        is_greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled.to(logits.device)).tolist()

    def _penalized(self, logits: Any, rows: list[_Row]) -> Any:
        """(B, V) logits with each row's repetition penalty on the tokens of its prompt and reply so far."""
        import torch

        params = [r.req.params for r in rows]
        if all(p.repetition_penalty == 1.0 for p in params):
            return logits
        return penalize_repeats(logits, [p.repetition_penalty for p in params], torch.stack([r.seen for r in rows]))

    def _settle(self, row: _Row, token: int | None) -> bool:
        """`_accept` for one row of a batched step, failing that row alone when it cannot go on; True when the row
        leaves the batch."""
        try:
            if token is None:
                raise GenerationFailed(f"{self.name}: generation failed (the model's next-token scores for this "
                                       "request are NaN or infinite)")
            return self._accept(row, token)
        except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
            self._fail([row.req], e)
            return True

    def _accept(self, row: _Row, token: int) -> bool:
        """Add a sampled token to a row, stream what is safe to show; True when the row is finished."""
        req, p = row.req, row.req.params
        row.sampled += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if req.cancelled:
            req._finish(row.shown, "cancelled", row.sampled)
            return True
        if token in self.eos_ids and not p.ignore_eos:
            return self._end(row, self._text(row), "stop")
        row.tokens.append(token)
        if token < self.vocab_size:
            row.seen[token] = True
        text = self._text(row)
        if row.stops:
            text, hit = cut_at_stop(text, row.stops)
            if hit:
                return self._end(row, text, "stop")
        if len(row.tokens) >= req.max_new_tokens:
            return self._end(row, text, "length")
        safe = stream_safe(text, row.stops)
        if len(safe) > len(row.shown) and safe.startswith(row.shown):
            req._push(safe[len(row.shown):])
            row.shown = safe
        return False

    def _text(self, row: _Row) -> str:
        # the template puts a space before the reply; a reply never starts with whitespace
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()

    def _end(self, row: _Row, text: str, reason: str) -> bool:
        # cut off mid-way ("length"), a reply may end in part of a stop sequence: that part goes too
        text = stream_safe(text, row.stops)
        if text.startswith(row.shown) and len(text) > len(row.shown):
            row.req._push(text[len(row.shown):])
        row.req._finish(text, reason, row.sampled)
        return True


def server_threads() -> int:
    """CPU threads for a serving process: all cores but one, which is left to the HTTP server and the tokenizer.
    On a busy machine, intra-op threads that outnumber the free cores spin and wait on each other: we measured
    decoding 20x slower with 2 threads than with 1 on 2 shared cores."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


DECODE_ROOM = 128
"""Positions of KV cache reserved ahead for the running batch (models.reserve_cache): one copy per 128 tokens."""


def _decode_cache(kv: list[tuple[Any, Any]]) -> Any:
    """The running batch's cache from each layer's (keys, values), written in place as tokens come."""
    from transformers import DynamicCache

    from rlhfchat.decoding import reserve_cache

    return reserve_cache(DynamicCache(ddp_cache_data=kv), DECODE_ROOM)


def _layers(cache: Any) -> Iterator[tuple[Any, Any]]:
    """(keys, values) of each layer of a DynamicCache, each (B, heads, T, head_dim)."""
    for layer in cache.layers:
        yield layer.keys, layer.values


def _load_model(source: str, dtype: Any) -> tuple[Any, str | Path]:
    """The causal LM of a folder (or of a hub id, as models.resolve_model gave it), or of a LoRA adapter folder
    merged into its base (models.load_model_folder); and where its tokenizer is."""
    from rlhfchat.models import find_adapter, load_model_folder

    adapter = find_adapter(source)
    return load_model_folder(source, dtype=dtype, what="a causal LM"), adapter.tokenizer if adapter else source


def vllm_available() -> bool:
    try:
        import importlib.util

        import torch

        return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    except Exception:
        return False


def load_engine(model_dir: str | Path, *, backend: str = "auto", **kw: Any) -> Any:
    """A chat engine for a model folder: vLLM when installed with a GPU present (backend="auto"), else HF."""
    if backend not in ("auto", "hf", "vllm"):
        raise RlhfchatError(f"backend: expected auto, hf or vllm, got {backend!r}")
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        from rlhfchat.chat.engine_vllm import VLLMEngine

        kw.pop("dtype", None)
        kw.pop("device", None)
        kw.pop("threads", None)
        return VLLMEngine(model_dir, **kw)
    return ChatEngine(model_dir, **kw)
