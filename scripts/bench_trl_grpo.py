"""The baseline for `rlhfchat bench ppo --advantage-estimator grpo`: TRL's GRPOTrainer on the same models and work.

Runs in its own virtual environment (TRL 1.16.0, the newest release on the registry when this was written):

    python3 -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 && /tmp/trl116/bin/pip install trl==1.16.0
    /tmp/trl116/bin/python scripts/bench_trl_grpo.py --policy DIR --reward DIR --prompts FILE.jsonl \\
        --batch 16 --samples-per-prompt 4 --new-tokens 32 --rollouts 2 --ppo-epochs 1 --minibatch 8

The same work as `rlhfchat bench ppo --advantage-estimator grpo` with the same flags: `--rollouts` generation
batches of `--batch` prompts x `--samples-per-prompt` completions (TRL's num_generations), every completion exactly
`--new-tokens` long (min_new_tokens = max_new_tokens through generation_kwargs: EOS cannot be sampled), and
`--ppo-epochs` passes (TRL's num_iterations) over each batch in slices of `--minibatch` completions with one
optimizer step each (per_device_train_batch_size = minibatch, gradient_accumulation_steps 1, steps_per_generation =
the batch's completions / minibatch). The KL to a reference model enters the loss as GRPO's k3 with `--kl-coef`
(TRL's beta, which makes TRL load the reference); advantages are normalised within each prompt's group
(scale_rewards group). The optimizer is set as ours: AdamW, lr 1e-6, betas (0.9, 0.95), weight decay 1e-6, a
constant learning rate, the gradient clipped to norm 1. TRL's GRPOConfig defaults that would change the work are set
back to what we do: gradient_checkpointing False (TRL's default is True), bf16 only with --bf16 (TRL's default is
on), the dataset in order (shuffle_dataset False), so both sides answer the same prompts.

Prints one JSON line with the fields both benchmarks share (samples_per_s, tokens_per_s, gen_s, train_s, total_s,
cpu_s, peak_rss_mb, optimizer_steps); `gen_s` is the time in TRL's `_generate` (encoding the prompts, generate,
decoding the completions), `train_s` the rest of `trainer.train()`.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time

from trl_bench_args import repeated_prompts, timed, work_parser


def main() -> None:
    parser = work_parser(__doc__.splitlines()[0], ppo_epochs=1, ppo_epochs_help="num_iterations (default 1)",
                         batch_help="prompts per generation batch (default 16)",
                         rollouts_help="generation batches (default 2)",
                         minibatch_help="completions per optimizer step (default 8)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="num_generations (default 4)")
    parser.add_argument("--kl-coef", type=float, default=0.1, help="beta (default 0.1)")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    reward_tokenizer = AutoTokenizer.from_pretrained(args.reward)

    # The same prompts in the same order: a list of messages goes through the chat template (TRL applies it).
    dataset = Dataset.from_dict({"prompt": repeated_prompts(args.prompts, args.batch * args.rollouts)})

    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id

    completions = args.batch * args.samples_per_prompt
    if completions % args.minibatch:
        parser.error(f"--batch x --samples-per-prompt ({completions}) must be a multiple of --minibatch")
    steps_per_generation = completions // args.minibatch
    max_steps = args.rollouts * steps_per_generation * args.ppo_epochs
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_bench_"),
        per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation, num_generations=args.samples_per_prompt,
        num_iterations=args.ppo_epochs, max_steps=max_steps,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, top_p=1.0, top_k=0, beta=args.kl_coef, epsilon=0.2, scale_rewards="group",
        loss_type="dapo", shuffle_dataset=False,
        learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.95, weight_decay=1e-6, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=args.bf16,
        report_to="none", save_strategy="no", logging_steps=1, seed=args.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=reward_tokenizer)
    if trainer.ref_model is None:
        raise SystemExit("TRL built no reference model (beta 0?)")

    # Time generation by wrapping the trainer's _generate (encode, generate, decode: the one place it generates).
    trainer._generate, gen_s = timed(trainer._generate)
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    samples = completions * args.rollouts
    print(json.dumps({
        "impl": f"trl-{trl.__version__}", "trainer": "GRPOTrainer", "samples": samples,
        "samples_per_s": round(samples / total, 3), "tokens_per_s": round(samples * args.new_tokens / total, 1),
        "gen_s": round(gen_s[0], 3), "train_s": round(total - gen_s[0], 3), "total_s": round(total, 3),
        "cpu_s": round(cpu, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "optimizer_steps": trainer.state.global_step, "threads": args.threads,
        "mixed_precision": "bf16" if args.bf16 else "no", "samples_per_prompt": args.samples_per_prompt,
        "prompts": args.batch * args.rollouts, "kl_coef": args.kl_coef, "num_iterations": args.ppo_epochs,
        "policy_params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "reward_params_m": round(sum(p.numel() for p in reward_model.parameters()) / 1e6, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
