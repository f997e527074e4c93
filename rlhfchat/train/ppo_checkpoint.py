"""PPO checkpoints: written whole or not at all (atomic_dir); the latest one is kept.

A checkpoint holds the trainable weights (policy or LoRA adapters, value head, critic), the optimizer, the KL
controller and running score statistics, every rank's RNG states and the loop's counters, so a killed run resumes
at the same step, on any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlhfchat.atomic import atomic_dir, write_json
from rlhfchat.train.policy import load_trainable_state_dict, trainable_state_dict

if TYPE_CHECKING:
    from rlhfchat.train.ppo import PPO


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


def save_checkpoint(root: Path, step: int, ppo: PPO, extra: dict[str, Any]) -> None:
    """policy + value head (trainable weights), optimizer, KL controller, running stats, RNG states, counters."""
    from safetensors.torch import save_file

    acc = ppo.accelerator
    path = root / f"step-{step:06d}"
    with atomic_dir(path) if acc.is_main_process else contextlib.nullcontext() as tmp:
        holder = [str(tmp) if tmp is not None else None]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(holder)
        tmp = Path(holder[0])
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            save_file(trainable_state_dict(ppo.unwrapped), str(tmp / "trainable.safetensors"))
            torch.save(ppo.optimizer.state_dict(), tmp / "optimizer.pt")
            write_json(tmp / "state.json", {"step": step, "ppo": ppo.state_dict(), **extra})
        acc.wait_for_everyone()
    if acc.is_main_process:
        for old in root.glob("step-*"):
            if old.name != path.name:
                import shutil

                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, ppo: PPO) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    load_trainable_state_dict(ppo.unwrapped, load_file(str(path / "trainable.safetensors")))
    ppo.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    ppo.load_state_dict(state["ppo"])
    rng = path / f"rng-{ppo.accelerator.process_index}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=False))
    return state
