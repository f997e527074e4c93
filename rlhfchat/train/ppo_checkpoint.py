"""PPO checkpoints: written whole or not at all (atomic_dir); the latest one is kept.

A checkpoint holds the trainable weights (policy or LoRA adapters, value head, critic) in float32 (the master copies
where the policy is stored in 16 bits), AdamW's moments of each of them and its step count, the KL controller and
running score statistics, every rank's RNG states and the loop's counters, so a killed run resumes at the same step.

    step-000004/  trainable.safetensors   whole float32 tensors by parameter name
                  optimizer.safetensors   NAME.exp_avg, NAME.exp_avg_sq, whole, by name
                  state.json              step, optimizer step count, PPO state, sampler, counters
                  rng-<rank>.pt           each rank's RNG states

Every tensor is whole and named, whatever the layout that wrote it: under DeepSpeed ZeRO-2/3 the partitions of every
rank are gathered before rank 0 writes them (optim.full_state), and any layout (ZeRO-3 on 8 GPUs, DDP, one CPU
process) puts them back into its own partitions (optim.load_full_state). So a run resumes on the same or another
number of processes; a rank that did not exist before takes rank 0's RNG states.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlhfchat.atomic import atomic_dir, write_json
from rlhfchat.errors import RlhfchatError
from rlhfchat.train.optim import full_state, load_full_state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, accelerator: Any, params: Sequence[tuple[str, torch.Tensor]], optimizer: Any,
                    state: dict[str, Any]) -> None:
    """Write checkpoint `step`: the trainable `params` (name, parameter) whole in float32, the `optimizer`'s moments,
    every rank's RNG states and `state` (JSON: the loop's counters and its algorithm's state); every rank calls it."""
    from safetensors.torch import save_file

    acc = accelerator
    path = root / f"step-{step:06d}"
    with atomic_dir(path) if acc.is_main_process else contextlib.nullcontext() as tmp:
        holder = [str(tmp) if tmp is not None else None]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(holder)
        tmp = Path(holder[0])
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        weights, moments, optimizer_step = full_state(optimizer, params)  # every rank
        if acc.is_main_process:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_file(moments, str(tmp / "optimizer.safetensors"))
            write_json(tmp / "state.json", {"step": step, "optimizer_step": optimizer_step, **state})
        acc.wait_for_everyone()
    if acc.is_main_process:
        for old in root.glob("step-*"):
            if old.name != path.name:
                import shutil

                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, accelerator: Any, params: Sequence[tuple[str, torch.Tensor]], optimizer: Any
                    ) -> dict[str, Any]:
    """Restore checkpoint `path` into the trainable `params` and the `optimizer` (before the first update) and the
    RNG states; every rank calls it. Returns state.json (the caller restores its own state from it)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if "optimizer_step" not in state:
        raise RlhfchatError(f"{path}: a checkpoint in an older layout (optimizer.pt); remove {path.parent} to start "
                            "the stage over")
    load_full_state(optimizer, params, load_file(str(path / "trainable.safetensors")),
                    load_file(str(path / "optimizer.safetensors")), state["optimizer_step"])
    rng = path / f"rng-{accelerator.process_index}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=False))
    return state
