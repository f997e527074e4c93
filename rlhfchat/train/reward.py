"""Stage 3: the reward model, initialised from the SFT checkpoint and trained on preference pairs.

    rlhfchat reward recipes/tiny-cpu.yaml [reward.learning_rate=1e-5 ...]

Reads `<run>/data/preferences.{train,eval}.jsonl` and `<run>/sft/`, puts a scalar head on the SFT model (scored at
the last real token: `AutoModelForSequenceClassification` with one label) and trains it with TRL's RewardTrainer
(Bradley-Terry loss on chosen vs rejected, each rendered through the chat template). Writes a Hugging Face
sequence-classification folder to `<run>/reward/` with `metrics.json`: `eval_accuracy` (share of held-out pairs
whose chosen reply scores above the rejected one) and `eval_loss`.
"""

from __future__ import annotations

from pathlib import Path

from rlhfchat import manifest
from rlhfchat.config import Recipe, config_hash
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import load_pretrained, load_tokenizer, torch_dtype
from rlhfchat.train import hf_stage


def to_pairs(ds):
    """Canonical preference records -> TRL's conversational implicit-prompt form (prompt + chosen/rejected turns)."""
    def convert(rec):
        return {"prompt": rec["prompt"],
                "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                "rejected": [{"role": "assistant", "content": rec["rejected"]}]}

    return ds.map(convert, remove_columns=ds.column_names)


def main(recipe: Recipe, init: str | Path | None = None) -> Path:
    """The reward stage; `init` is the model it starts from: by default the SFT model with a fresh scalar head, for
    `rlhfchat iterate` the previous round's reward model (its head kept)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    run = recipe.run_dir
    stage_dir = run / "reward"
    sft_dir = Path(init) if init is not None else run / "sft"
    train_file, eval_file = run / "data" / "preferences.train.jsonl", run / "data" / "preferences.eval.jsonl"

    # 1. Inputs: the finished SFT model and the preference pairs.
    if not (sft_dir / "config.json").is_file():
        raise RlhfchatError(f"{sft_dir}: no SFT model; run `rlhfchat sft RECIPE.yaml` first")
    manifest.require_complete(sft_dir)
    manifest.require_complete(run / "data")
    inputs = manifest.input_hashes(run, [sft_dir, train_file, eval_file])
    chash = config_hash({"reward": recipe.reward, "seed": recipe.seed, "dtype": recipe.base.dtype})
    if hf_stage.prepare("reward", stage_dir, chash, inputs):
        return stage_dir

    with manifest.running("reward", stage_dir, chash, inputs) as m:
        # 2. Data: each pair becomes prompt+chosen and prompt+rejected through the chat template.
        train_ds = to_pairs(hf_stage.load_jsonl_dataset(train_file))
        eval_ds = to_pairs(hf_stage.load_jsonl_dataset(eval_file))

        # 3. Model: the SFT trunk with a fresh scalar head; the pad token tells it where the last real token is.
        tokenizer = load_tokenizer(sft_dir)
        tokenizer.padding_side = "right"
        cfg = recipe.reward
        torch.manual_seed(recipe.seed)
        model = load_pretrained(AutoModelForSequenceClassification, sft_dir, torch_dtype(recipe.base.dtype), cfg.lora,
                                "reward.lora.quantize", cfg.gradient_checkpointing, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id

        args = RewardConfig(
            **hf_stage.trainer_args(cfg, stage_dir, recipe.seed, recipe.base.dtype),
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        resume = hf_stage.latest_checkpoint(stage_dir)
        m["resumed_from"] = str(resume.relative_to(stage_dir)) if resume else None
        logger = hf_stage.metrics_logger(stage_dir / "metrics.jsonl", resume)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds if len(eval_ds) else None,
            processing_class=tokenizer,
            peft_config=hf_stage.peft_config(cfg.lora, "SEQ_CLS"),
            callbacks=[logger],
        )

        if cfg.lora.quantize and not args.bf16:
            # TRL keeps a 4-bit model's trainable weights in bf16, for bf16 autocast; without autocast (CPU, or
            # base.dtype float32) the trained copy of the score head would meet float32 hidden states.
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

        # 4. Train, then measure pairwise accuracy on the held-out pairs.
        metrics = hf_stage.train(trainer, logger, resume)  # the figures of all steps, also when resumed
        if len(eval_ds):
            ev = trainer.evaluate()
            metrics.update(eval_loss=ev["eval_loss"], eval_accuracy=ev["eval_accuracy"],
                           eval_margin=ev.get("eval_margin"), eval_pairs=len(eval_ds))

        # 5. Save the folder (LoRA merged), tokenizer and template, and the figures.
        hf_stage.save_model_folder(trainer.model, tokenizer, stage_dir, torch_dtype(recipe.base.dtype), metrics)
        print(f"[reward] train_loss {metrics['train_loss']:.4f}"
              + (f"  eval_accuracy {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else "")
              + f"  -> {stage_dir}")
    manifest.barrier()  # every rank goes on to the next stage only once this one's manifest says complete
    return stage_dir


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
