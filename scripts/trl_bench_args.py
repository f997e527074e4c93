"""What the two TRL baselines (bench_trl_ppo.py, bench_trl_grpo.py) share: the flags that fix the work, the prompts,
the timer around TRL's generation.

Both run in their own virtual environment with only TRL and torch, so this imports nothing from rlhfchat; they find it
beside them (a script's folder is the first entry of sys.path).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable


def work_parser(description: str, *, ppo_epochs: int, ppo_epochs_help: str | None = None,
                batch_help: str | None = None, rollouts_help: str | None = None,
                minibatch_help: str | None = None) -> argparse.ArgumentParser:
    """The flags of `rlhfchat bench ppo` that fix the work, with each baseline's defaults; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--batch", type=int, default=16, help=batch_help)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rollouts", type=int, default=2, help=rollouts_help)
    parser.add_argument("--ppo-epochs", type=int, default=ppo_epochs, help=ppo_epochs_help)
    parser.add_argument("--minibatch", type=int, default=8, help=minibatch_help)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def repeated_prompts(path: str, needed: int) -> list:
    """The first `needed` prompts of a JSONL file's `prompt` fields, from the top again when it has fewer (as ours)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [rows[i % len(rows)] for i in range(needed)]


def timed(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[float]]:
    """`fn` wrapped to add the wall seconds of each call to the list it comes with (its one item): the baselines put
    it in place of the one function TRL generates through, to split generation from the rest of training."""
    spent = [0.0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    return wrapper, spent
