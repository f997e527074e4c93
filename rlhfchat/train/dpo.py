"""Stage 3 under `method: dpo`: the SFT model trained on the preference pairs directly, with TRL's DPOTrainer.

    rlhfchat dpo recipes/tiny-cpu.yaml method=dpo [dpo.beta=0.1 dpo.loss_type=ipo ...]

Reads `<run>/sft/` (where the policy starts, and its reference) and `<run>/data/preferences.{train,eval}.jsonl`
(rendered through the chat template as the reward stage renders them), trains with the loss `dpo.loss_type` and
writes `<run>/dpo/`: a Hugging Face causal-LM folder (LoRA merged) with its tokenizer and template,
`metrics.json`, `metrics.jsonl`, `manifest.json` and `checkpoints/`. Skipped when complete for the same recipe
section and inputs; an interrupted run resumes from its newest checkpoint (train/hf_stage.py).

The reference is the SFT model: TRL loads a frozen copy of it, or with `dpo.lora` switches the adapters off (TRL
does either when it is given no ref_model). metrics.json holds TRL's held-out figures: `eval_loss`, `eval_margin`
(the implicit reward margin: beta x how much more the policy than the reference prefers the chosen reply over the
rejected one, on average over held-out pairs; 0 before training, where the policy is the reference) and
`eval_accuracy` (the share of held-out pairs whose implicit reward ranks the chosen reply first).

KTO (train/kto.py) is this stage with unpaired examples and TRL's KTOTrainer: both run through `run` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rlhfchat import stage
from rlhfchat.config import Recipe
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import load_pretrained, load_tokenizer, torch_dtype
from rlhfchat.train import hf_stage
from rlhfchat.train.reward import to_pairs

# TRL's figures kept in metrics.json, under our names ("eval_" + TRL's key -> ours)
EVAL_FIGURES = {"loss": "eval_loss", "rewards/margins": "eval_margin", "rewards/accuracies": "eval_accuracy",
                "rewards/chosen": "eval_reward_chosen", "rewards/rejected": "eval_reward_rejected", "kl": "eval_kl"}


def trl_args(recipe: Recipe) -> dict[str, Any]:
    """DPOConfig's own arguments from the recipe's `dpo` section."""
    cfg = recipe.dpo
    return dict(loss_type=[cfg.loss_type], beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                precompute_ref_log_probs=cfg.precompute_ref_log_probs)


def datasets_for(recipe: Recipe, train_file: Path, eval_file: Path):
    """(train, held-out) datasets in TRL's conversational implicit-prompt preference form."""
    return (to_pairs(hf_stage.load_jsonl_dataset(train_file)), to_pairs(hf_stage.load_jsonl_dataset(eval_file)))


def run(recipe: Recipe, method: str, trainer_classes: Callable[[], tuple[type, type]],
        make_args: Callable[[Recipe], dict[str, Any]], make_datasets: Callable[[Recipe, Path, Path], Any],
        extra_inputs: tuple[Path, ...] = ()) -> dict:
    """The DPO or KTO stage (rlhfchat/stage.py): `trainer_classes()` gives TRL's (config, trainer) classes,
    `make_args` the config's method-specific arguments, `make_datasets` the (train, eval) datasets; `extra_inputs`
    are further data files the datasets read (hashed when they exist). Returns the stage's metrics."""
    data = recipe.run_dir / "data"
    train_file, eval_file = data / "preferences.train.jsonl", data / "preferences.eval.jsonl"
    extra = [p for p in extra_inputs if p.is_file()]
    return stage.run(recipe, method, inputs=[recipe.run_dir / "sft", train_file, eval_file, *extra],
                     config={method: getattr(recipe, method), "seed": recipe.seed, "dtype": recipe.base.dtype},
                     body=lambda m: _train(recipe, method, trainer_classes, make_args, make_datasets, m))


def _train(recipe: Recipe, method: str, trainer_classes: Callable[[], tuple[type, type]],
           make_args: Callable[[Recipe], dict[str, Any]], make_datasets: Callable[[Recipe, Path, Path], Any],
           m: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, cfg = recipe.run_dir, getattr(recipe, method)
    stage_dir, sft_dir = run_dir / method, run_dir / "sft"
    train_file, eval_file = run_dir / "data" / "preferences.train.jsonl", run_dir / "data" / "preferences.eval.jsonl"
    # 1. Data: TRL renders prompt and replies through the chat template and masks all but the replies.
    train_ds, eval_ds = make_datasets(recipe, train_file, eval_file)
    if not len(train_ds):
        raise RlhfchatError(f"{train_file}: no preference records to train {method.upper()} on")

    # 2. The policy starts as the SFT model; with no ref_model, TRL takes the SFT model as the reference too.
    tokenizer = load_tokenizer(sft_dir)
    torch.manual_seed(recipe.seed)
    model = load_pretrained(AutoModelForCausalLM, sft_dir, torch_dtype(recipe.base.dtype), cfg.lora,
                            f"{method}.lora.quantize", cfg.gradient_checkpointing)
    config_cls, trainer_cls = trainer_classes()
    args = config_cls(**hf_stage.trainer_args(cfg, stage_dir, recipe.seed, recipe.base.dtype),
                      **make_args(recipe), dataset_num_proc=None)

    # 3. Train (from the newest checkpoint when there is one), then TRL's figures on the held-out data.
    trainer, metrics = hf_stage.fit(trainer_cls, stage_dir, m, model=model, ref_model=None, args=args,
                                    train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                    peft_config=hf_stage.peft_config(cfg.lora, "CAUSAL_LM"))
    metrics["train_examples"] = len(train_ds)
    if len(eval_ds):
        ev = trainer.evaluate()
        metrics.update({ours: ev[f"eval_{key}"] for key, ours in EVAL_FIGURES.items() if f"eval_{key}" in ev})
        metrics["eval_examples"] = len(eval_ds)

    # 4. Save the folder (LoRA merged), tokenizer and template, and the figures.
    hf_stage.save_model_folder(trainer.model, tokenizer, stage_dir, torch_dtype(recipe.base.dtype), metrics)
    print(f"[{method}] train_loss {metrics['train_loss']:.4f}"
          + (f"  eval_margin {metrics['eval_margin']:.4f}" if metrics.get("eval_margin") is not None else "")
          + f"  -> {stage_dir}")


def _trl_dpo() -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def main(recipe: Recipe) -> dict:
    return run(recipe, "dpo", _trl_dpo, trl_args, datasets_for)


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
