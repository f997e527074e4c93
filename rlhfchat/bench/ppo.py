"""`rlhfchat bench ppo`: PPO samples per second and peak memory on any policy and reward folders, one JSON line.

    rlhfchat bench ppo --policy runs/tiny/sft --reward runs/tiny/reward --prompts runs/tiny/data/prompts.train.jsonl \\
        --batch 16 --new-tokens 32 --rollouts 2 --ppo-epochs 4 --minibatch 8

    rlhfchat bench ppo ... --advantage-estimator grpo --samples-per-prompt 4 --ppo-epochs 1

Runs the real PPO iteration of `rlhfchat ppo` (rlhfchat.train.ppo.PPO: make_experience, then update) for
`--rollouts` iterations of `--batch` prompts each, `--samples-per-prompt` replies to every prompt. The work is
fixed: every response is exactly --new-tokens long (min_new_tokens = max_new_tokens, no stop sequences), so runs
and implementations compare like for like (scripts/bench_trl_ppo.py runs TRL 1.12's PPOTrainer on the same work,
scripts/bench_trl_grpo.py TRL's GRPOTrainer, and each prints the fields both share).

A critic-free `--advantage-estimator` (grpo, dr_grpo, rloo, reinforce_pp) builds no value head; the KL to the
reference then has a fixed coefficient `--kl-coef` (GRPO's beta) and enters where `--kl-penalty` says (default: the
loss, GRPO's k3, for grpo and dr_grpo; the reward for the others). gae keeps trlX's adaptive controller from
`--kl-coef` (target 6), the KL in the reward.

`--prompts` rows have a `prompt`: a string is the model's input verbatim (no template), a list of chat messages
goes through the policy's chat template. `gen_s` is the time in generation (step 1, with encoding the prompts and
cutting the replies); `train_s` everything else, split into `score_s` (the reward model), `forward_s` (old
logprobs and values, the reference's logprobs), `update_s` (the PPO epochs: forward, backward, optimizer steps)
and the little left for advantages; peak_rss_mb is the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from rlhfchat.config import ESTIMATORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="DIR", help="a Hugging Face causal-LM folder")
    parser.add_argument("--reward", required=True, metavar="DIR", help="a sequence-classification folder, 1 label")
    parser.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="rows with a `prompt`")
    parser.add_argument("--batch", type=int, default=16, help="prompts per rollout (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per response, exactly (default 32)")
    parser.add_argument("--rollouts", type=int, default=2, help="PPO iterations (default 2)")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=8, help="samples per optimizer step (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--separate-critic", action="store_true", help="a critic network instead of share_trunk")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="every row computes its whole prompt (ppo.share_prompt_prefix: false)")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters; the reference is the adapter disabled")
    parser.add_argument("--num-layers-unfrozen", type=int, default=-1, metavar="N",
                        help="train only the top N decoder blocks, trlX v0.6.0's hydra (default -1: all); less work than "
                             "TRL's PPO, which trains every layer")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="bf16: autocast compute, fp32 policy weights, bf16 frozen reference and reward")
    parser.add_argument("--advantage-estimator", choices=list(ESTIMATORS), default="gae",
                        help="ppo.advantage_estimator (default gae: PPO with a value head)")
    parser.add_argument("--samples-per-prompt", type=int, default=1, metavar="G",
                        help="replies to each prompt (the group, ppo.samples_per_prompt); a rollout is --batch x G "
                             "samples (default 1)")
    parser.add_argument("--chunk-size", type=int, default=None, metavar="N",
                        help="samples generated, scored and run through the rollout forwards at a time "
                             "(ppo.chunk_size; default: the whole rollout, --batch x G, as TRL's GRPOTrainer does)")
    parser.add_argument("--kl-coef", type=float, default=0.1, help="the KL coefficient beta (default 0.1)")
    parser.add_argument("--kl-penalty", choices=["reward", "loss"], default=None,
                        help="ppo.kl_penalty (default: loss for grpo and dr_grpo, reward otherwise)")
    parser.add_argument("--seed", type=int, default=0)


def read_prompts(path: str) -> list[Any]:
    from rlhfchat.errors import RlhfchatError

    prompts = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise RlhfchatError(f"{path}: cannot read the prompts ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RlhfchatError(f"{path} line {lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
                raise RlhfchatError(f"{path} line {lineno}: expected a `prompt` (a string or a list of messages)")
            prompts.append(row["prompt"])
    if not prompts:
        raise RlhfchatError(f"{path}: no prompts")
    return prompts


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed

    from rlhfchat.config import GenerationConfig, LoraConfig, PPOConfig
    from rlhfchat.train.ppo import PPO
    from rlhfchat.train.runtime import Runtime

    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    prompts = read_prompts(args.prompts)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, stop_sequences=[],
                                  max_prompt_length=1024)
    estimator, group = args.advantage_estimator, args.samples_per_prompt
    kl_penalty = args.kl_penalty or ("loss" if estimator in ("grpo", "dr_grpo") else "reward")
    samples_per_rollout = args.batch * group  # generated, scored and trained on as one chunk
    cfg = PPOConfig(num_rollouts=samples_per_rollout, chunk_size=args.chunk_size or samples_per_rollout,
                    ppo_epochs=args.ppo_epochs, batch_size=args.minibatch, grad_accum=1, generation=generation,
                    share_trunk=not args.separate_critic, share_prompt_prefix=not args.no_share_prefix,
                    lora=LoraConfig(enabled=args.lora), num_layers_unfrozen=args.num_layers_unfrozen,
                    advantage_estimator=estimator, samples_per_prompt=group, kl_penalty=kl_penalty,
                    init_kl_coef=args.kl_coef, target=6.0 if estimator == "gae" else None)
    rt = Runtime.start(mixed_precision=args.mixed_precision)  # as `rlhfchat ppo` sets the process up
    ppo = PPO.from_folders(args.policy, args.reward, cfg, rt, seed=args.seed, reward_max_length=1024)

    # make_experience times its own steps (generate, score, the rollout forwards); the update is timed here.
    phases = {"gen_s": 0.0, "score_s": 0.0, "forward_s": 0.0, "update_s": 0.0}
    samples = tokens = 0
    with rt.loop():  # as `rlhfchat ppo` runs its loop
        t0, cpu0 = time.perf_counter(), time.process_time()
        for it in range(args.rollouts):
            batch = [prompts[(it * args.batch + i) % len(prompts)] for i in range(args.batch)]
            seeds = [it * samples_per_rollout + i for i in range(samples_per_rollout)]
            exp, stats = ppo.make_experience(batch, seeds=seeds)
            t = time.perf_counter()
            ppo.update(exp)
            phases["update_s"] += time.perf_counter() - t
            for key in ("gen_s", "score_s", "forward_s"):
                phases[key] += stats[key]
            samples += exp.input_ids.shape[0]
            tokens += exp.mask.shape[0] * exp.mask.shape[1]  # generated positions (fixed length)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    result = {
        "impl": "rlhfchat", "samples": samples, "samples_per_s": round(samples / total, 3),
        "tokens_per_s": round(tokens / total, 1), "gen_s": round(phases["gen_s"], 3),
        "train_s": round(total - phases["gen_s"], 3), "total_s": round(total, 3), "cpu_s": round(cpu, 1),
        "score_s": round(phases["score_s"], 3), "forward_s": round(phases["forward_s"], 3),
        "update_s": round(phases["update_s"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "optimizer_steps": ppo.optimizer_steps, "threads": args.threads, "share_trunk": cfg.share_trunk,
        "share_prompt_prefix": cfg.share_prompt_prefix, "chunk_size": cfg.chunk_size, "advantage_estimator": estimator,
        "samples_per_prompt": group,
        "prompts": args.batch * args.rollouts, "kl_penalty": kl_penalty, "kl_coef": args.kl_coef,
        "value_head": getattr(ppo.unwrapped, "value_head", None) is not None,
        "lora": args.lora, "num_layers_unfrozen": args.num_layers_unfrozen, "mixed_precision": args.mixed_precision,
        "policy_params_m": round(sum(p.numel() for p in ppo.unwrapped.lm.parameters()) / 1e6, 2),
        "reward_params_m": round(sum(p.numel() for p in ppo.scorer.model.parameters()) / 1e6, 2),
    }
    print(json.dumps(result), flush=True)
    return result
