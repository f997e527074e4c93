"""Stage manifests: what makes a run resumable and a finished stage skippable.

Each stage folder (`runs/NAME/sft/`, ...) holds `manifest.json`:

    {"stage": "sft", "status": "running" | "complete", "config_hash": "...", "inputs": {"data/sft.train.jsonl": "sha256..."},
     "started": "...", "finished": "...", "wall_seconds": 12.3, "resumed_from": "checkpoints/checkpoint-40" | null}

A stage whose manifest says complete with the same config hash and the same input hashes is skipped. A model folder
made by an earlier stage is hashed through that stage's own manifest (cheap, and it covers that stage's inputs); an
outside model folder by its file names and sizes; a hub id by its name.

A stage reads another stage's folder only once that folder's manifest says complete (`require_complete`: one line
naming the folder otherwise); a folder without a manifest is a model made elsewhere and is taken as it is. Where a
stage starts, the temporary files an interrupted attempt left in its folder are removed (`sweep`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from rlhfchat import atomic
from rlhfchat.atomic import write_json
from rlhfchat.errors import RlhfchatError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_input(path: str | Path) -> str:
    """A hash standing for an input: a file's bytes, a stage folder's manifest, a folder's listing, or a hub id."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        manifest = p / MANIFEST
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            body = json.dumps([m.get("config_hash"), m.get("inputs"), m.get("finished")], sort_keys=True)
            return hashlib.sha256(body.encode()).hexdigest()
        listing = sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*") if f.is_file())
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return hashlib.sha256(f"hub:{path}".encode()).hexdigest()


def read(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def input_hashes(run_dir: Path, inputs: list[str | Path]) -> dict[str, str]:
    """Hashes of a stage's inputs, keyed by their path relative to the run folder where they are inside it."""
    out = {}
    for item in inputs:
        p = Path(item)
        try:
            key = str(p.resolve().relative_to(Path(run_dir).resolve()))
        except ValueError:
            key = str(item)
        out[key] = hash_input(p)
    return out


def is_complete(stage_dir: Path, config_hash: str, inputs: dict[str, str]) -> bool:
    m = read(stage_dir)
    return bool(m and m.get("status") == "complete" and m.get("config_hash") == config_hash
                and m.get("inputs") == inputs)


def prepare(stage: str, stage_dir: Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """The skip and resume rule: True when the stage is complete for this config and these inputs (skip it).

    Otherwise checkpoints left by an attempt with another config or other inputs are removed, so that only an
    attempt at the same work resumes from them.
    """
    import shutil

    if is_complete(stage_dir, config_hash, inputs):
        print(f"[{stage}] complete for this recipe and inputs; skipping ({stage_dir})")
        return True
    previous = read(stage_dir)
    ckpt = Path(stage_dir) / "checkpoints"
    changed = previous and (previous.get("config_hash") != config_hash or previous.get("inputs") != inputs)
    if changed and ckpt.exists() and is_main_process():
        print(f"[{stage}] recipe or inputs changed since the last attempt; starting over")
        shutil.rmtree(ckpt)
    return False


def require_complete(folder: str | Path) -> dict[str, Any] | None:
    """A stage folder's manifest, refusing with one line naming the folder when it does not say complete.

    A folder without `manifest.json` (a model made elsewhere, or nothing there yet) gives None: the caller reports a
    missing file itself, in its own words.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        status, stage = m.get("status"), m.get("stage")
    except (OSError, ValueError, AttributeError) as e:
        raise RlhfchatError(f"{path}: not a valid stage manifest ({e})") from None
    if status != "complete":
        command = {"base": "sft"}.get(stage, stage)  # the tiny base is built by the sft stage
        raise RlhfchatError(f"{folder}: incomplete: its {MANIFEST} says the {stage} stage is {status!r} (interrupted, "
                            f"or still running); rerun `rlhfchat {command} RECIPE.yaml` to finish it")
    return m


def sweep(stage_dir: str | Path) -> None:
    """Remove the temporary files an interrupted attempt left anywhere in a stage folder (rank 0 only: the other
    ranks may start earlier or later, and the writes are rank 0's)."""
    if is_main_process():
        atomic.sweep(stage_dir, recursive=True)


def distributed_state():
    """accelerate's process state; on a machine without GPUs the ranks talk over gloo on the CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch`/torchrun (and a plain single process): the only one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (building, writing); the other ranks run it after, and find the work done."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    with distributed_state().main_process_first():
        yield


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed_state().wait_for_everyone()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def running(stage: str, stage_dir: Path, config_hash: str, inputs: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Mark the stage running while the body executes, complete when it returns; a failure leaves it running.

    The yielded dict can take extra fields (e.g. `resumed_from`); they are written with the final manifest.
    What an interrupted attempt left in the folder (temporary files) is removed first.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    sweep(stage_dir)
    previous = read(stage_dir) or {}
    manifest = {"stage": stage, "status": "running", "config_hash": config_hash, "inputs": inputs,
                "started": _now(), "finished": None, "wall_seconds": None,
                "attempts": int(previous.get("attempts", 0)) + 1}
    main = is_main_process()
    if main:
        write_json(stage_dir / MANIFEST, manifest)
    t0 = time.perf_counter()
    yield manifest
    manifest.update(status="complete", finished=_now(), wall_seconds=round(time.perf_counter() - t0, 2))
    if main:
        write_json(stage_dir / MANIFEST, manifest)
