"""The whole recipe in one command: data -> sft -> reward -> ppo -> eval -> report.

    rlhfchat pipeline recipes/tiny-cpu.yaml [key=value ...]

Each stage writes its own folder under the run folder with a `manifest.json`; a stage that is complete for the same
recipe section and inputs is skipped, and an interrupted one resumes from its last checkpoint, so re-running the
same command after a crash (or a kill) picks up where it stopped. Stage order and what each reads:

    data/    <- the sources in the recipe
    base/    <- data/ (only for base.model: tiny)
    sft/     <- base model, data/sft.*.jsonl
    reward/  <- sft/, data/preferences.*.jsonl
    ppo/     <- sft/ (policy and reference), reward/, data/prompts.*.jsonl
    eval/    <- sft/, ppo/, reward/, data/prompts.eval.jsonl
"""

from __future__ import annotations

import importlib
import time

from rlhfchat import manifest
from rlhfchat.atomic import atomic_file
from rlhfchat.config import Recipe, config_hash, dump_recipe

STAGES = [
    ("data", "rlhfchat.data.mixture"),
    ("sft", "rlhfchat.train.sft"),
    ("reward", "rlhfchat.train.reward"),
    ("ppo", "rlhfchat.train.ppo"),
    ("eval", "rlhfchat.eval.run"),
    ("report", "rlhfchat.eval.report"),
]


def run_data(recipe: Recipe) -> None:
    """The data stage, skipped when the data section, the seed and the source files are unchanged."""
    from rlhfchat.data import mixture

    run = recipe.run_dir
    stage_dir = run / "data"
    sources = [s.path for kind in ("sft", "preferences", "prompts") for s in getattr(recipe.data, kind)]
    inputs = manifest.input_hashes(run, sources)
    chash = config_hash({"data": recipe.data, "seed": recipe.seed})
    if manifest.is_complete(stage_dir, chash, inputs):
        print(f"[data] complete for this recipe and inputs; skipping ({stage_dir})")
        return
    t0 = time.perf_counter()
    mixture.main(recipe)
    # The data folder is replaced whole by the data stage, so its manifest is written once it is in place.
    with manifest.running("data", stage_dir, chash, inputs) as m:
        m["build_seconds"] = round(time.perf_counter() - t0, 2)


def main(recipe: Recipe) -> None:
    run = recipe.run_dir
    run.mkdir(parents=True, exist_ok=True)
    with atomic_file(run / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))
    t0 = time.perf_counter()
    for name, module in STAGES:
        print(f"\n=== {name} ===", flush=True)
        if name == "data":
            run_data(recipe)
        else:
            importlib.import_module(module).main(recipe)
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f}s; run folder: {run}")
