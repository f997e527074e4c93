"""Stage 2: supervised fine-tuning on the conversation mixture, loss on assistant tokens only.

    rlhfchat sft recipes/tiny-cpu.yaml [sft.max_steps=50 ...]

Reads `<run>/data/sft.{train,eval}.jsonl` and the base model, runs TRL's SFTTrainer (optional packing, optional
LoRA or QLoRA merged at the end) and writes a Hugging Face model folder to `<run>/sft/` with the run's chat template (base.chat_template),
`metrics.json` (train_loss, eval_loss), `metrics.jsonl` and `manifest.json`. Re-running a finished stage skips it;
an interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import math

from rlhfchat import manifest, stage
from rlhfchat.config import Recipe
from rlhfchat.models import load_pretrained, load_tokenizer, torch_dtype
from rlhfchat.tiny import ensure_base
from rlhfchat.train import hf_stage


def assistant_loss_dataset(ds, tokenizer):
    """(dataset, whether TRL masks it) for a loss on assistant tokens only.

    TRL's SFTTrainer masks a conversational dataset itself when the template has `{% generation %}` markers, or when
    TRL ships a training version of that exact template (Llama 3's, Qwen's, ...). Any other template (a model's own
    ChatML or Mistral format, say) gets token ids and an `assistant_masks` column made by rendering
    (chat_format.assistant_token_mask), which TRL turns into the labels the same way.
    """
    from rlhfchat.data.chat_format import assistant_token_mask, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return ds, True
    try:
        from trl.chat_template_utils import get_training_chat_template

        get_training_chat_template(tokenizer)
        return ds, True
    except (ImportError, ValueError):  # no training version of this template in TRL
        pass

    def encode(row):
        ids, mask = assistant_token_mask(tokenizer, row["messages"])
        return {"input_ids": ids, "assistant_masks": mask}

    return ds.map(encode, remove_columns=ds.column_names), False


def main(recipe: Recipe) -> dict:
    """The SFT stage (rlhfchat/stage.py: skipped when done, resumed when interrupted); returns its metrics."""
    run = recipe.run_dir
    data = run / "data"
    # The base model: `base.model` as given, or the tiny model, built once from the run's data (rank 0 first).
    stage.check_inputs(run, [data / "sft.train.jsonl"])
    with manifest.main_process_first():
        base = ensure_base(recipe)
    return stage.run(recipe, "sft", inputs=[base, data / "sft.train.jsonl", data / "sft.eval.jsonl"],
                     config={"sft": recipe.sft, "seed": recipe.seed, "base": recipe.base},
                     body=lambda m: train(recipe, base, m))


def train(recipe: Recipe, base: str, m: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    stage_dir, data = recipe.run_dir / "sft", recipe.run_dir / "data"
    # 1. Data: canonical conversations; the loss falls on assistant tokens only.
    train_ds = hf_stage.load_jsonl_dataset(data / "sft.train.jsonl").select_columns(["messages"])
    eval_ds = hf_stage.load_jsonl_dataset(data / "sft.eval.jsonl").select_columns(["messages"])

    # 2. Model and tokenizer, with the run's chat template (base.chat_template), and each conversation's
    #    assistant tokens: TRL's mask where the template marks them, else found by rendering.
    tokenizer = load_tokenizer(base, recipe.base.chat_template)
    tokenizer.padding_side = "right"
    train_ds, trl_masks = assistant_loss_dataset(train_ds, tokenizer)
    eval_ds, _ = assistant_loss_dataset(eval_ds, tokenizer)
    cfg = recipe.sft
    torch.manual_seed(recipe.seed)
    # lora.quantize: 4bit loads the frozen base in 4-bit (QLoRA); the adapters go on top in the trainer
    model = load_pretrained(AutoModelForCausalLM, base, torch_dtype(recipe.base.dtype), cfg.lora,
                            "sft.lora.quantize", cfg.gradient_checkpointing)
    args = SFTConfig(**hf_stage.trainer_args(cfg, stage_dir, recipe.seed, recipe.base.dtype),
                     assistant_only_loss=trl_masks, packing=cfg.packing, dataset_num_proc=None)

    # 3. Train (from the newest checkpoint when one exists), then evaluate on the held-out conversations.
    trainer, metrics = hf_stage.fit(SFTTrainer, stage_dir, m, model=model, args=args, train_dataset=train_ds,
                                    eval_dataset=eval_ds, processing_class=tokenizer,
                                    peft_config=hf_stage.peft_config(cfg.lora, "CAUSAL_LM"))
    if len(eval_ds):
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))

    # 4. Save the model folder (LoRA merged) with its tokenizer and template, then the figures.
    hf_stage.save_model_folder(trainer.model, tokenizer, stage_dir, torch_dtype(recipe.base.dtype), metrics)
    print(f"[sft] train_loss {metrics['train_loss']:.4f}"
          + (f"  eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "") + f"  -> {stage_dir}")


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
