"""The baseline for `rlhfchat bench ppo`: TRL 1.12's PPOTrainer (trl.experimental.ppo) on the same models and work.

TRL removed its PPOTrainer in 1.13, so this runs in its own virtual environment:

    python3 -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0 && /tmp/trl112/bin/pip install trl==1.12.0
    /tmp/trl112/bin/python scripts/bench_trl_ppo.py --policy DIR --reward DIR --prompts FILE.jsonl \\
        --batch 16 --new-tokens 32 --rollouts 2 --ppo-epochs 4 --minibatch 8

The same work as ours: `--rollouts` PPO batches of `--batch` prompts, every response exactly `--new-tokens` long (the
policy has no stop token, so generation never ends early), `--ppo-epochs` passes over minibatches of `--minibatch`
with one optimizer step each, `--threads` torch threads. TRL needs four networks: the policy, a reference copy, a
value model (a sequence-classification model, initialised from the reward folder as TRL's examples do) and the
reward model. Prints one JSON line with the fields both benchmarks share (samples_per_s, tokens_per_s, gen_s,
train_s, total_s, cpu_s, peak_rss_mb; not rlhfchat's finer split of train_s); `gen_s` is the time inside TRL's
generation function, `train_s` the rest of `trainer.train()`.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time

from trl_bench_args import repeated_prompts, timed, work_parser


def main() -> None:
    parser = work_parser(__doc__.splitlines()[0], ppo_epochs=4)
    parser.add_argument("--lora", action="store_true",
                        help="LoRA on the policy (r 16, alpha 32, attention projections, as `rlhfchat bench ppo "
                             "--lora`); the reference is the adapter disabled, the value model trains in full")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"

    # The same prompt tokens as ours: a string verbatim, a list of messages through the chat template.
    rows = repeated_prompts(args.prompts, args.batch * args.rollouts)

    def encode(prompt):
        if isinstance(prompt, str):
            return tokenizer(prompt).input_ids
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])

    dataset = Dataset.from_dict({"input_ids": [encode(p) for p in rows]})

    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref_policy = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    value_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    for model in (value_model, reward_model):
        model.config.pad_token_id = tokenizer.pad_token_id

    # Rollout batch = per_device_train_batch_size x gradient_accumulation_steps, split into num_mini_batches; with
    # accumulation 1 TRL takes one optimizer step per minibatch, as we do.
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_ppo_bench_"),
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=args.batch // args.minibatch, local_rollout_forward_batch_size=args.batch,
        total_episodes=len(rows), num_ppo_epochs=args.ppo_epochs, response_length=args.new_tokens,
        stop_token=None, stop_token_id=None, missing_eos_penalty=None, temperature=1.0,
        learning_rate=1e-6, kl_coef=0.1, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0, gamma=1.0, lam=0.95,
        num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1, seed=args.seed,
        use_cpu=not torch.cuda.is_available(), bf16=args.bf16, disable_tqdm=True,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         eval_dataset=dataset, peft_config=peft_config)

    # Time generation by wrapping TRL's batch_generation (the only place it generates during training).
    trl_ppo.batch_generation, gen_s = timed(trl_ppo.batch_generation)
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    samples = config.batch_size * config.num_total_batches
    print(json.dumps({
        "impl": f"trl-{trl.__version__}", "samples": samples, "samples_per_s": round(samples / total, 3),
        "tokens_per_s": round(samples * args.new_tokens / total, 1), "gen_s": round(gen_s[0], 3),
        "train_s": round(total - gen_s[0], 3), "total_s": round(total, 3), "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": args.threads, "lora": args.lora, "mixed_precision": "bf16" if args.bf16 else "no",
        "policy_params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "reward_params_m": round(sum(p.numel() for p in reward_model.parameters()) / 1e6, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
