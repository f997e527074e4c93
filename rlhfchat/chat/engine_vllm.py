"""The vLLM backend of the chat engine: same methods as engine.ChatEngine, for GPU serving.

`load_engine` picks it when vLLM is installed and a CUDA GPU is present. vLLM does its own continuous batching and
paged KV cache; this class runs vLLM's async engine on an event loop in a background thread and feeds the same
`Request` handles as the HF backend, with the same stop handling (stop sequences held back while streaming).
A LoRA adapter folder is served on its base model through vLLM's LoRA support.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

from rlhfchat.chat.request import (
    EngineBusy, EngineCalls, EngineClosed, GenerationFailed, Request, SamplingParams, chars_per_token_bound,
    stop_sequences, stream_safe,
)


class VLLMEngine(EngineCalls):
    """vLLM's AsyncLLMEngine behind the ChatEngine interface (fit/encode/submit/stream/generate/generate_many)."""

    backend = "vllm"

    def __init__(self, model_dir: str | Path, *, name: str | None = None, max_batch: int = 256, max_queue: int = 64,
                 gpu_memory_utilization: float = 0.85):
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from transformers import AutoConfig

        from rlhfchat.models import find_adapter, load_tokenizer

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.max_batch, self.max_queue = max_batch, max_queue
        adapter = find_adapter(self.model_dir)  # served on its base through vLLM's LoRA support
        self._lora = None
        base, tokenizer = str(self.model_dir), str(self.model_dir)
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            base, tokenizer = adapter.base, adapter.tokenizer
            self._lora = LoRARequest(self.name, 1, str(self.model_dir))
        self.tokenizer = load_tokenizer(tokenizer)
        self.chars_per_token = chars_per_token_bound(self.tokenizer)
        cfg = AutoConfig.from_pretrained(base)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.context_window = int(getattr(cfg, "max_position_embeddings", 2048))
        args = AsyncEngineArgs(model=base, tokenizer=tokenizer,
                               max_model_len=self.context_window, max_num_seqs=max_batch,
                               gpu_memory_utilization=gpu_memory_utilization, enable_lora=self._lora is not None)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{self.name}", daemon=True)
        self._thread.start()
        self._llm = asyncio.run_coroutine_threadsafe(self._create(AsyncLLMEngine, args), self._loop).result()
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False

    @staticmethod
    async def _create(cls: Any, args: Any) -> Any:
        return cls.from_engine_args(args)

    def submit(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *, truncate: bool = True,
               block: bool = False) -> Request:
        params = (params or SamplingParams()).check()  # before vLLM sees it: a bad value fails this request alone
        used, ids, budget = self.fit(messages, params.max_new_tokens, truncate)
        req = Request(used, params, ids, self.name, budget)
        with self._lock:
            if self._closed:
                raise EngineClosed(f"{self.name}: the engine is closed")
            limit = self.max_batch + self.max_queue
            if self._inflight >= limit:
                if not block:
                    raise EngineBusy(f"{self.name}: busy ({self._inflight} requests in flight); try again shortly")
                self._lock.wait_for(lambda: self._inflight < limit)
            self._inflight += 1
        asyncio.run_coroutine_threadsafe(self._run(req, f"{self.name}-{next(self._ids)}"), self._loop)
        return req

    def load(self) -> dict[str, int]:
        return {"running": self._inflight, "waiting": 0}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        shutdown = getattr(self._llm, "shutdown", None)
        if shutdown:
            shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _run(self, req: Request, rid: str) -> None:
        import time

        from vllm import SamplingParams as VllmParams

        p, stops = req.params, stop_sequences(req.params)
        sp = VllmParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
                        repetition_penalty=p.repetition_penalty, seed=p.seed, max_tokens=req.max_new_tokens,
                        stop=stops or None, ignore_eos=p.ignore_eos, skip_special_tokens=True)
        shown, text, reason, n = "", "", "length", 0
        try:
            async for out in self._llm.generate({"prompt_token_ids": req.prompt_ids}, sp, rid, lora_request=self._lora):
                o = out.outputs[0]
                n = len(o.token_ids)
                if n and req.first_token_at is None:
                    req.first_token_at = time.perf_counter()
                if req.cancelled:
                    await self._llm.abort(rid)
                    req._finish(shown, "cancelled", n)
                    return
                text = o.text.lstrip()
                safe = stream_safe(text, stops)
                if len(safe) > len(shown) and safe.startswith(shown):
                    req._push(safe[len(shown):])
                    shown = safe
                if out.finished:
                    reason = "length" if o.finish_reason == "length" else "stop"
            final = stream_safe(text, stops)
            if final.startswith(shown) and len(final) > len(shown):
                req._push(final[len(shown):])
            req._finish(final, reason, n)
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            req._push(error=GenerationFailed(f"{self.name}: generation failed ({type(e).__name__}: {e})"))
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

