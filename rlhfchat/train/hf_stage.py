"""Plumbing shared by the stages that run a TRL trainer (SFT, reward, DPO, KTO): resume, logging, LoRA, saving.

(The skip rule every stage shares is manifest.prepare, through rlhfchat/stage.py.)

A stage folder looks like

    runs/NAME/sft/  config.json model.safetensors tokenizer.json chat_template.jinja   (the model, HF layout)
                    metrics.json      final figures (train_loss, eval_loss, ...)
                    metrics.jsonl     one line per logging step, as the Trainer logs them
                    manifest.json     status, config hash, input hashes, wall time
                    checkpoints/      Trainer checkpoints; an interrupted run resumes from the newest
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rlhfchat import manifest
from rlhfchat.config import LoraConfig
from rlhfchat.errors import RlhfchatError


def _is_complete(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint is whole: the Trainer writes its trainer_state.json last (not atomically)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def remove_partial_checkpoints(stage_dir: Path) -> None:
    """Remove the Trainer checkpoints a kill cut short (at 13B, tens of GB of optimizer state); rank 0 only."""
    partial = [p for p in (stage_dir / "checkpoints").glob("checkpoint-*") if not _is_complete(p)]
    if partial and manifest.is_main_process():
        print(f"[{stage_dir.name}] removing {len(partial)} checkpoint(s) an interrupted save left incomplete")
        for p in partial:
            shutil.rmtree(p)


def fit(trainer_cls: Any, stage_dir: Path, m: dict[str, Any], *, args: Any, train_dataset: Any, eval_dataset: Any,
        before_train: Any = None, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """A TRL trainer made and trained from the stage's newest checkpoint when there is one: (trainer, figures).

    The manifest `m` records the checkpoint resumed from; metrics.jsonl gets every log (metrics_logger), and the
    figures are those of all steps, also after a resume (train). `before_train(trainer)` runs between the two.
    """
    remove_partial_checkpoints(stage_dir)
    resume = latest_checkpoint(stage_dir)
    m["resumed_from"] = str(resume.relative_to(stage_dir)) if resume else None
    logger = metrics_logger(stage_dir / "metrics.jsonl", resume)
    trainer = trainer_cls(args=args, train_dataset=train_dataset,
                          eval_dataset=eval_dataset if eval_dataset is not None and len(eval_dataset) else None,
                          callbacks=[logger], **kwargs)
    if before_train is not None:
        before_train(trainer)
    return trainer, train(trainer, logger, resume)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (`checkpoint-N` with a whole trainer_state.json), if any."""
    ckpts = [p for p in (stage_dir / "checkpoints").glob("checkpoint-*") if _is_complete(p)]
    return max(ckpts, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint folder (`checkpoint-<step>`) was saved at."""
    return int(checkpoint.name.split("-")[-1])


def metrics_logger(path: Path, resume: Path | None = None):
    """A TrainerCallback appending every log to `metrics.jsonl`, so that a resumed run's figures are an
    uninterrupted run's:

    - every checkpoint is also a logging step (the callback asks for a log wherever the Trainer saves), so the
      checkpoint's own log (`trainer_state.json`'s log_history) accounts for every step up to it;
    - a run resuming from the checkpoint folder `resume` first rewrites `metrics.jsonl` from that log: lines written
      after it by the interrupted attempt (a summary row, eval rows, a line cut short by the kill) go;
    - the summary row's `train_loss` is the mean over all steps, the ones before the resume included (the Trainer
      reports the mean of this attempt's steps only: 0.0 when it resumed from the final checkpoint); the callback
      keeps it as `train_loss` for metrics.json.
    """
    from transformers import TrainerCallback

    from rlhfchat.atomic import atomic_file

    history = _checkpoint_log(resume) if resume else []
    if manifest.is_main_process() and (path.exists() or history):
        with atomic_file(path) as f:
            f.write("".join(_jsonl_line(row) for row in history))

    class JsonlLogger(TrainerCallback):
        train_loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step  # after the Trainer loaded the checkpoint's state

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_loss" in logs and "train_runtime" in logs:  # the Trainer's summary at the end
                logs = dict(logs, train_loss=mean_train_loss(state.log_history, self.start_step, state.global_step,
                                                             logs["train_loss"]))
                self.train_loss = logs["train_loss"]
            if state.is_world_process_zero and logs:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(_jsonl_line({"step": state.global_step, "epoch": state.epoch, **logs}))

    return JsonlLogger()


def _jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps({"step": row.get("step", 0), "epoch": row.get("epoch"), **row}) + "\n"


def _checkpoint_log(checkpoint: Path) -> list[dict[str, Any]]:
    """What the Trainer had logged when it saved `checkpoint` (its trainer_state.json's log_history)."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return []


def mean_train_loss(log: list[dict[str, Any]], start: int, end: int, attempt_loss: float) -> float:
    """The mean loss over steps 1..`end` of a run that resumed at step `start`.

    `attempt_loss` is the Trainer's figure, the mean over steps start+1..end; the steps before come from the loss
    rows logged up to `start` (each the mean over the steps since the row before it). Steps no row covers (a
    checkpoint saved between two logs by an older rlhfchat) are left out of the mean.
    """
    if start == 0:
        return attempt_loss
    total, covered, last = 0.0, 0, 0
    for row in log:
        step = row.get("step", 0)
        if "loss" in row and last < step <= start:
            total += row["loss"] * (step - last)
            covered += step - last
            last = step
    steps = covered + (end - start)
    return (total + attempt_loss * (end - start)) / steps if steps else attempt_loss


def train(trainer: Any, logger: Any, resume: Path | None) -> dict[str, Any]:
    """`trainer.train()`, from the checkpoint `resume` when given; returns `train_loss` over all steps and `steps`.

    `logger` is the trainer's `metrics_logger` callback. TRL counts the tokens trained on (`num_tokens` in the logs)
    in the trainer rather than in its saved state: a resumed run continues the count from the checkpoint's log.
    """
    if resume is not None and hasattr(trainer, "_total_train_tokens"):
        counts = [row["num_tokens"] for row in _checkpoint_log(resume) if "num_tokens" in row]
        if counts:
            trainer._total_train_tokens = int(counts[-1])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    loss = logger.train_loss if logger.train_loss is not None else result.training_loss
    return {"train_loss": loss, "steps": result.global_step}


def peft_config(lora: LoraConfig, task_type: str):
    """A peft LoraConfig from the recipe's section, or None when LoRA is off."""
    if not lora.enabled:
        return None
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), task_type=task_type)


def trainer_args(cfg: Any, stage_dir: Path, seed: int, dtype: str) -> dict[str, Any]:
    """Arguments common to TRL's SFTConfig and RewardConfig, from our stage config."""
    import warnings

    import torch

    # TRL's configs default gradient_checkpointing to True, so we pass it; transformers warns about the old name.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to=list(cfg.report_to) or "none",
        seed=seed,
        data_seed=seed,
        bf16=gpu and dtype == "bfloat16",
        fp16=gpu and dtype == "float16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length,
        dataloader_num_workers=0,
        dataloader_pin_memory=gpu,
        use_cpu=not gpu,  # also what makes `accelerate launch` on a CPU machine run data-parallel over gloo
        disable_tqdm=False,
    )


def load_jsonl_dataset(path: Path):
    """A `datasets.Dataset` from a canonical JSONL file (no cache files beside the run)."""
    import datasets

    from rlhfchat.data.schema import read_jsonl

    if not path.is_file():
        raise RlhfchatError(f"{path}: not found; run `rlhfchat data RECIPE.yaml` first")
    return datasets.Dataset.from_list(list(read_jsonl(path)))


def save_model_folder(model: Any, tokenizer: Any, stage_dir: Path, dtype: Any, metrics: dict[str, Any]) -> None:
    """A finished stage's outputs, written by rank 0: the weights (LoRA merged into the base; a 4-bit base reloaded in
    `dtype` first, see lora.merged), the tokenizer with its chat template, saved to pad on the left as generation
    needs, in HF layout; then metrics.json. Every rank calls it: under DeepSpeed ZeRO-3 the weights are gathered from
    every rank's partitions first."""
    from rlhfchat.train.distributed import whole_parameters

    with whole_parameters(model):
        if not manifest.is_main_process():
            return
        from rlhfchat.atomic import write_json
        from rlhfchat.lora import merged

        model = merged(model, dtype)
        model.save_pretrained(stage_dir, safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(stage_dir)
        write_json(stage_dir / "metrics.json", metrics)
