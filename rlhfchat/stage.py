"""One skeleton for every stage of a run: inputs checked, work hashed, skipped when done, resumed when interrupted.

    def main(recipe):
        return stage.run(recipe, "sft", inputs=[run / "data" / "sft.train.jsonl", base],
                         config={"sft": recipe.sft, "seed": recipe.seed}, body=lambda m: train(recipe, m))

`run` does, in order:
  1. sweep   the temporary files an interrupted attempt left in the stage's folder (atomic.py names them)
  2. inputs  every input inside the run folder must be there (one line naming it and the stage that makes it), and
             a stage folder among them must be complete (manifest.require_complete); inputs outside the run (a base
             model folder, a hub id, a source file) are hashed as they are
  3. skip    when the folder's manifest says complete for the same config hash and input hashes: the stage's result
             file is read back and returned, nothing runs
  4. run     otherwise checkpoints of another config or other inputs are removed (manifest.prepare), and `body(m)`
             runs inside manifest.running (the manifest says running, then complete; `m` takes extra fields such as
             the checkpoint resumed from), on every rank (training stages) or on rank 0 alone (`main_only`)
  5. barrier every rank waits until the manifest says complete
  6. result  the stage's result file (metrics.json, card.json, results.json) as a dict, on every rank
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhfchat import manifest
from rlhfchat.config import Recipe, config_hash
from rlhfchat.errors import RlhfchatError

STAGE_OF = {"data": "data", "base": "sft", "sft": "sft", "reward": "reward", "ppo": "ppo", "dpo": "dpo", "kto": "kto"}
"""The command that makes each folder of a run (the tiny base model is built by the sft stage)."""


def check_inputs(run: Path, inputs: Sequence[Path], optional: Sequence[Path] = ()) -> None:
    """Every input inside the run folder exists, and a stage folder among them (or the folder of a file) is complete;
    `optional` inputs may be missing. One line naming the first that is not."""
    optional_set = {Path(p) for p in optional}
    checked: set[Path] = set()
    for path in map(Path, inputs):
        try:
            rel = path.resolve().relative_to(run.resolve())
        except ValueError:
            continue  # outside the run: a base model, a hub id, a source file
        folder = run / rel.parts[0] if rel.parts else run
        if not path.exists():
            if path in optional_set:
                continue
            maker = STAGE_OF.get(rel.parts[0]) if rel.parts else None
            hint = f"; run `rlhfchat {maker} RECIPE.yaml` first" if maker else ""
            raise RlhfchatError(f"{path}: not found{hint}")
        if folder not in checked:
            manifest.require_complete(folder)
            checked.add(folder)


def result_of(folder: Path, result: str) -> dict[str, Any]:
    """A stage's result file as a dict ({} when the stage writes none)."""
    path = folder / result
    return json.loads(path.read_text()) if path.is_file() else {}


def run(recipe: Recipe, name: str, *, inputs: Sequence[Path], config: Any, body: Callable[[dict[str, Any]], Any],
        optional: Sequence[Path] = (), result: str = "metrics.json", main_only: bool = False,
        folder: Path | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) stage `name` of `recipe` into `folder` (default: the run folder's `name`); returns
    its result file as a dict. See the module docstring for the steps."""
    run_dir = recipe.run_dir
    folder = Path(folder) if folder is not None else run_dir / name
    manifest.sweep(folder)
    check_inputs(run_dir, inputs, optional)
    hashes = manifest.input_hashes(run_dir, [p for p in inputs if Path(p) not in set(map(Path, optional))
                                             or Path(p).exists()])
    chash = config_hash(config)
    if manifest.prepare(name, folder, chash, hashes) and (folder / result).is_file():
        return result_of(folder, result)
    if main_only and not manifest.is_main_process():
        manifest.barrier()  # rank 0 does the work; the others wait for it
        return result_of(folder, result)
    with manifest.running(name, folder, chash, hashes) as m:
        body(m)
    manifest.barrier()  # every rank goes on only once this stage's manifest says complete
    return result_of(folder, result)
