"""`rlhfchat bench generate MODEL_DIR`: chat engine latency and throughput, one JSON line.

    rlhfchat bench generate runs/tiny/ppo --streams 8 --max-new-tokens 128

Measures time to first token (p50, p95) and tokens per second of one stream, and the total tokens per second of
`--streams` concurrent streams (submitted at once, decoded as one batch); the two kinds of round alternate so that
both see the same load. Every reply is exactly --max-new-tokens long (EOS and stop sequences ignored), so the two
numbers count the same work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

PROMPT = [
    {"role": "system", "content": "A chat between a curious human and an artificial intelligence assistant."},
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per reply (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="single-stream requests and concurrent rounds")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores - 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights' dtype (default: float32 on CPU, bfloat16 on GPU)")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _consume(req: Any, out: list[Any]) -> None:
    for _ in req:
        pass
    out.append(req.result())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rlhfchat.chat.engine import SamplingParams, load_engine, server_threads

    kw = {k: v for k, v in (("threads", args.threads or server_threads()), ("dtype", args.dtype)) if v}
    engine = load_engine(args.model_dir, backend=args.backend, max_batch=max(1, args.streams),
                         max_queue=max(64, args.streams), **kw)
    try:
        def params(seed: int) -> SamplingParams:
            return SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=seed,
                                  ignore_eos=True)

        # warm-up: one stream and one full batch, so allocations and lazy inits are out of the timings
        engine.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
        for r in [engine.submit(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True, seed=i))
                  for i in range(args.streams)]:
            r.result()

        # single and concurrent rounds alternate, so that both see the same load on a shared machine
        single: list[Any] = []
        many: list[Any] = []
        single_time = many_time = 0.0
        for rnd in range(args.rounds):
            t0 = time.perf_counter()
            single.append(engine.generate(PROMPT, params(rnd)))
            single_time += time.perf_counter() - t0

            t0 = time.perf_counter()
            reqs = [engine.submit(PROMPT, params(1000 * (rnd + 1) + i)) for i in range(args.streams)]
            threads = [threading.Thread(target=_consume, args=(r, many)) for r in reqs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            many_time += time.perf_counter() - t0
        single_tokens = sum(c.completion_tokens for c in single)
        many_tokens = sum(c.completion_tokens for c in many)

        n_params = None
        if hasattr(engine, "model"):
            n_params = sum(p.numel() for p in engine.model.parameters())
        single_tps = single_tokens / single_time
        many_tps = many_tokens / many_time
        result = {
            "bench": "generate",
            "model": str(args.model_dir),
            "parameters": n_params,
            "backend": engine.backend,
            "device": str(getattr(engine, "device", "cuda")),
            "dtype": str(getattr(getattr(engine, "model", None), "dtype", "auto")).replace("torch.", ""),
            "torch_threads": _threads(),
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": single[0].prompt_tokens,
            "single": {
                "requests": len(single),
                "ttft_p50_s": round(statistics.median(c.ttft_s for c in single), 4),
                "ttft_p95_s": round(_pct([c.ttft_s for c in single], 0.95), 4),
                "tokens_per_s": round(single_tps, 1),
            },
            "concurrent": {
                "streams": args.streams,
                "requests": len(many),
                "ttft_p50_s": round(statistics.median(c.ttft_s for c in many), 4),
                "ttft_p95_s": round(_pct([c.ttft_s for c in many], 0.95), 4),
                "total_tokens_per_s": round(many_tps, 1),
                "per_stream_tokens_per_s": round(many_tps / args.streams, 1),
            },
            "speedup": round(many_tps / single_tps, 2),
        }
    finally:
        engine.close()
    print(json.dumps(result), flush=True)
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()
