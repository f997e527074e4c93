"""The whole recipe in one command: data -> sft -> reward -> ppo -> eval -> report.

    rlhfchat pipeline recipes/tiny-cpu.yaml [key=value ...]
    rlhfchat pipeline recipes/tiny-cpu.yaml method=dpo        # data -> sft -> dpo -> reward -> eval -> report

`method` chooses the route (see `stages`): ppo, StableVicuna's; dpo or kto, where the policy learns from the
preference data directly and the reward model is trained only for the evaluation's win rates (`eval.win_rates`).

Each stage writes its own folder under the run folder with a `manifest.json`; a stage that is complete for the same
recipe section and inputs is skipped, and an interrupted one resumes from its last checkpoint, so re-running the
same command after a crash (or a kill) picks up where it stopped. Stage order and what each reads:

    data/    <- the sources in the recipe
    base/    <- data/ (only for base.model: tiny)
    sft/     <- base model, data/sft.*.jsonl
    reward/  <- sft/, data/preferences.*.jsonl
    ppo/     <- sft/ (policy and reference), reward/, data/prompts.*.jsonl
    dpo/ kto/ <- sft/ (start and reference), data/preferences.*.jsonl
    eval/    <- sft/, ppo/ (or dpo/, kto/), reward/, data/prompts.eval.jsonl
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from rlhfchat.atomic import atomic_file, sweep
from rlhfchat.config import Recipe, dump_recipe
from rlhfchat.manifest import is_main_process

STAGES = [
    ("data", "rlhfchat.data.mixture"),
    ("sft", "rlhfchat.train.sft"),
    ("reward", "rlhfchat.train.reward"),
    ("ppo", "rlhfchat.train.ppo"),
    ("eval", "rlhfchat.eval.run"),
    ("report", "rlhfchat.eval.report"),
]


DIRECT = {"dpo": "rlhfchat.train.dpo", "kto": "rlhfchat.train.kto"}
"""The stages that train the policy on preferences directly (`method: dpo | kto`)."""


def stages(recipe: Recipe) -> list[tuple[str, str]]:
    """The route of `recipe.method`: STAGES for ppo; for dpo and kto, DPO or KTO in place of reward -> ppo, then the
    reward model where the evaluation scores replies with it (`eval.win_rates`)."""
    if recipe.method == "ppo":
        return list(STAGES)
    route = [("data", "rlhfchat.data.mixture"), ("sft", "rlhfchat.train.sft"),
             (recipe.method, DIRECT[recipe.method])]
    if recipe.eval.win_rates:
        route.append(("reward", "rlhfchat.train.reward"))
    return route + [("eval", "rlhfchat.eval.run"), ("report", "rlhfchat.eval.report")]


def main(recipe: Recipe) -> None:
    run = recipe.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # each stage sweeps its own folder when it starts
        sweep(run, names=("recipe.yaml",))
    with atomic_file(run / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))
    t0 = time.perf_counter()
    for name, module in stages(recipe):
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(module).main(recipe)
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f}s; run folder: {run}")
    print(f"report: {run / 'eval' / 'report.md'}")
    trained = {"ppo": recipe.ppo.advantage_estimator.upper().replace("GAE", "PPO").replace("_PP", "++")
               }.get(recipe.method, recipe.method.upper())  # the RL stage's estimator names it: PPO, GRPO, RLOO, ...
    print(f"chat with the {trained} model as round-1 (web page, OpenAI API, an arena against the SFT "
          "model), then open http://127.0.0.1:8000/ :")
    exe = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "rlhfchat" else "rlhfchat"
    # served as round-1 beside sft: the names `rlhfchat iterate`'s rounds keep, so the arena's votes add up
    print(f"  {exe} serve --rounds {run}")
