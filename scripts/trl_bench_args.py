"""What the two TRL baselines (bench_trl_ppo.py, bench_trl_grpo.py) share: the flags that fix the work, the prompts.

Both run in their own virtual environment with only TRL and torch, so this imports nothing from rlhfchat; they find it
beside them (a script's folder is the first entry of sys.path).
"""

from __future__ import annotations

import argparse
import json


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
