"""Stage 3: the reward model, initialised from the SFT checkpoint and trained on preference pairs.

    rlhfchat reward recipes/tiny-cpu.yaml [reward.learning_rate=1e-5 ...]

Reads `<run>/data/preferences.{train,eval}.jsonl` and `<run>/sft/`, puts a scalar head on the SFT model (scored at
the last real token: `AutoModelForSequenceClassification` with one label) and trains it with TRL's RewardTrainer
(Bradley-Terry loss on chosen vs rejected, each rendered through the chat template). Writes a Hugging Face
sequence-classification folder to `<run>/reward/` with `metrics.json`: `eval_accuracy` (share of held-out pairs
whose chosen reply scores above the rejected one) and `eval_loss`.

`RewardScorer` scores (prompt, reply) pairs with such a folder, for PPO's rewards and eval's win rates:

    scores = RewardScorer("runs/tiny/reward").score(prompts, replies)     # (N,) float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfchat import manifest, stage
from rlhfchat.atomic import write_json
from rlhfchat.config import Recipe
from rlhfchat.data.chat_format import Prompt, reward_text
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import load_pretrained, load_tokenizer, torch_dtype
from rlhfchat.train import hf_stage
from rlhfchat.train.distributed import frozen_forward


def to_pairs(ds):
    """Canonical preference records -> TRL's conversational implicit-prompt form (prompt + chosen/rejected turns)."""
    def convert(rec):
        return {"prompt": rec["prompt"],
                "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                "rejected": [{"role": "assistant", "content": rec["rejected"]}]}

    return ds.map(convert, remove_columns=ds.column_names)


def main(recipe: Recipe, init: str | Path | None = None) -> dict:
    """The reward stage (rlhfchat/stage.py); `init` is the model it starts from: by default the SFT model with a fresh
    scalar head, for `rlhfchat iterate` the previous round's reward model (its head kept). Returns its metrics."""
    run = recipe.run_dir
    start = Path(init) if init is not None else run / "sft"
    return stage.run(recipe, "reward", inputs=[start, run / "data" / "preferences.train.jsonl",
                                               run / "data" / "preferences.eval.jsonl"],
                     config={"reward": recipe.reward, "seed": recipe.seed, "dtype": recipe.base.dtype},
                     body=lambda m: train(recipe, start, m))


def train(recipe: Recipe, start: Path, m: dict) -> None:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    run, stage_dir, cfg = recipe.run_dir, recipe.run_dir / "reward", recipe.reward
    if not (start / "config.json").is_file():
        raise RlhfchatError(f"{start}: no model to start the reward model from; run `rlhfchat sft RECIPE.yaml` first")
    # 1. Data: each pair becomes prompt+chosen and prompt+rejected through the chat template.
    train_ds = to_pairs(hf_stage.load_jsonl_dataset(run / "data" / "preferences.train.jsonl"))
    eval_ds = to_pairs(hf_stage.load_jsonl_dataset(run / "data" / "preferences.eval.jsonl"))

    # 2. Model: the SFT trunk with a fresh scalar head; the pad token tells it where the last real token is.
    tokenizer = load_tokenizer(start)
    tokenizer.padding_side = "right"
    torch.manual_seed(recipe.seed)
    model = load_pretrained(AutoModelForSequenceClassification, start, torch_dtype(recipe.base.dtype), cfg.lora,
                            "reward.lora.quantize", cfg.gradient_checkpointing, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**hf_stage.trainer_args(cfg, stage_dir, recipe.seed, recipe.base.dtype),
                        center_rewards_coefficient=cfg.center_rewards_coefficient)

    def float_head(trainer) -> None:
        # TRL keeps a 4-bit model's trainable weights in bf16, for bf16 autocast; without autocast (CPU, or
        # base.dtype float32) the trained copy of the score head would meet float32 hidden states.
        if cfg.lora.quantize and not args.bf16:
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

    # 3. Train, then measure pairwise accuracy on the held-out pairs.
    trainer, metrics = hf_stage.fit(RewardTrainer, stage_dir, m, model=model, args=args, train_dataset=train_ds,
                                    eval_dataset=eval_ds, processing_class=tokenizer, before_train=float_head,
                                    peft_config=hf_stage.peft_config(cfg.lora, "SEQ_CLS"))
    if len(eval_ds):
        ev = trainer.evaluate()
        metrics.update(eval_loss=ev["eval_loss"], eval_accuracy=ev["eval_accuracy"],
                       eval_margin=ev.get("eval_margin"), eval_pairs=len(eval_ds))

    # 4. Save the folder (LoRA merged), tokenizer and template, how it reads a text, and the figures.
    hf_stage.save_model_folder(trainer.model, tokenizer, stage_dir, torch_dtype(recipe.base.dtype), metrics)
    if manifest.is_main_process():
        write_json(stage_dir / SCORING, {"max_length": cfg.max_length})
    print(f"[reward] train_loss {metrics['train_loss']:.4f}"
          + (f"  eval_accuracy {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else "")
          + f"  -> {stage_dir}")


# --------------------------------------------------------------------------------------------------------------
# Scoring with a reward model: what PPO's step 2 and eval's win rates call

SCORING = "scoring.json"
"""In a reward folder: how the model reads a text, {"max_length": the tokens it was trained on}; scoring truncates
to the same length (from the left: the reply is what is judged)."""


def scoring_length(folder: str | Path) -> int | None:
    """The max_length a reward folder was trained with (its scoring.json), or None."""
    import json

    try:
        return int(json.loads((Path(folder) / SCORING).read_text())["max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RewardScorer:
    """A sequence-classification model with one label, scoring `reward_text(prompt, reply)`.

    Texts longer than `max_length` tokens lose the left end of the prompt (the reply is what is being judged).
    A string prompt (benchmarks) is scored as prompt + " " + reply, verbatim.
    """

    def __init__(self, path: str | Path | Any, tokenizer: Any = None, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, device: Any = None,
                 share_prefix: bool = True):
        from transformers import AutoModelForSequenceClassification

        from rlhfchat.models import load_model_folder, load_tokenizer, resolve_model

        if isinstance(path, (str, Path)):
            path = resolve_model(path)  # a folder or hub id; a weight delta is refused
            self.model = load_model_folder(path, AutoModelForSequenceClassification, dtype, "a reward model")
            tokenizer = tokenizer or load_tokenizer(path)
        else:
            self.model = path
        if self.model.config.num_labels != 1:
            raise RlhfchatError(f"{path}: a reward model needs num_labels=1, got {self.model.config.num_labels}")
        self.tokenizer = tokenizer
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.model.eval()
        if device is not None:
            self.model.to(device)
        # None: the length the reward model was trained on (its folder's scoring.json), else 512
        self.max_length = max_length or (scoring_length(path) if isinstance(path, (str, Path)) else None) or 512
        self.batch_size = batch_size
        self.share_prefix = share_prefix  # see forward

    def text(self, prompt: Prompt, reply: str) -> str:
        if isinstance(prompt, str):
            return f"{prompt} {reply}"
        return reward_text(self.tokenizer, prompt, reply)

    def score_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Scores of whole texts. N texts -> (N,) float32 on the CPU.

        Under ZeRO-3 (distributed.prepare_frozen) every rank must score the same number of texts."""
        device = next(self.model.parameters()).device
        tok = self.tokenizer
        sides = tok.truncation_side, tok.padding_side
        tok.truncation_side = tok.padding_side = "left"
        scores = []
        try:
            with frozen_forward(self.model):
                for start in range(0, len(texts), self.batch_size):
                    enc = tok(list(texts[start : start + self.batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=self.max_length, add_special_tokens=False).to(device)
                    scores.append(self.forward(enc["input_ids"], enc["attention_mask"]).float().cpu())
        finally:
            tok.truncation_side, tok.padding_side = sides
        return torch.cat(scores) if scores else torch.zeros(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of left-padded rows. (B, T) -> (B,).

        The model's own pooling (its head on the last token that is not padding), with the leading tokens all rows
        share computed once (trunk.hidden_from, when `share_prefix`); models whose head is not a linear `score` run
        whole.
        """
        from rlhfchat.train.trunk import hidden_from

        model = self.model
        trunk, head = getattr(model, model.base_model_prefix, None), getattr(model, "score", None)
        if trunk is None or not isinstance(head, torch.nn.Linear):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        # The rightmost token that is not padding, as HF's sequence classifiers pool.
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (cols * (input_ids != model.config.pad_token_id)).argmax(-1)
        start = int(last.min())
        hidden = hidden_from(trunk, input_ids, attention_mask, start, self.share_prefix)
        return head(hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last - start])[:, 0]

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> torch.Tensor:
        """Scores of replies to prompts. -> (N,) float32 on the CPU."""
        return self.score_texts([self.text(p, r) for p, r in zip(prompts, replies)])


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
