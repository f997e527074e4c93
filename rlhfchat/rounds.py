"""`rlhfchat iterate RECIPE.yaml --feedback DB_URL`: the next round of the model, from the feedback on this one.

    rlhfchat pipeline recipes/tiny-cpu.yaml                                    # round 1
    rlhfchat serve --rounds runs/tiny-cpu                                       # people chat, thumb and vote
    rlhfchat iterate recipes/tiny-cpu.yaml --feedback runs/tiny-cpu/feedback.db  # round 2; again later: round 3 ...

Round 1 is the pipeline's result as it is: the first `iterate` runs the pipeline (which skips what is finished)
and records its folders as round 1. Each call then makes one new round k+1 from the latest round k, when there is
new feedback:

  1. feedback  the votes and thumbs given since round k's snapshot (all of them for round 2), as preference pairs
               and, one reply each, unpaired examples (KTO's); saved in rounds/k+1/feedback/ with the snapshot's time
  2. data      rounds/k+1/data/: for training, the recipe's preference pairs (sampling weight
               iterate.preferences_weight) and the feedback's (iterate.feedback_weight), the recipe's prompts and the
               feedback's; for evaluation the run's own held-out pairs and prompts, so that every round is measured on
               the same prompts (feedback given on a held-out prompt is left out)
  3. start     rounds/k+1/sft/: a copy of round k's policy, where the round's policy starts and its reference (the
               stages read a run folder's sft/; a copy, so that the round keeps what it started from)
  4. reward    ppo, and dpo/kto when eval.win_rates: the reward model retrained from round k's on the round's pairs
  5. policy    ppo: PPO from round k's policy against the new reward model; dpo|kto: DPO or KTO from round k's policy
  6. eval      round k+1 against round k on the held-out prompts: win rate, math exact match, tasks, KL to round k
  7. report    rounds/k+1/eval/report.md, with the arena leaderboard of the feedback store

A round is a run folder of its own, so each of its stages skips and resumes as in a pipeline: kill `iterate`, run it
again, and it finishes the round it was in (with the feedback it had taken, and the recipe as it is now) and stops
there. Finished rounds are history: they are skipped, whatever the recipe says now (a changed recipe shapes the
next round), and so is the pipeline once round 1 is recorded.

    runs/NAME/rounds/1/round.json    round 1: the pipeline's folders (policy runs/NAME/ppo, or dpo/, kto/)
    runs/NAME/rounds/2/round.json    round 2: its method, start, policy, reward model, feedback window and figures
                      2/feedback/    preferences.jsonl, unpaired.jsonl: the feedback the round took
                      2/data/ 2/sft/ 2/reward/ 2/dpo/ (or ppo/, kto/) 2/eval/
    runs/NAME/rounds/latest          the number of the latest finished round (a file)

`latest(run_dir)` gives the latest round's policy folder and the one before it (round 1's start: the SFT model), and
`serving(run_dir)` the same with the names they are served under (round-K, round-(K-1) or sft): `rlhfchat serve
--rounds runs/NAME` puts them side by side in the arena.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhfchat import manifest
from rlhfchat.atomic import atomic_dir, atomic_file, sweep, write_json
from rlhfchat.config import Recipe, config_hash
from rlhfchat.data.schema import read_jsonl, record_key, write_jsonl
from rlhfchat.errors import RlhfchatError

NOT_COPIED = {"manifest.json", "metrics.json", "metrics.jsonl", "value_head.safetensors"}
"""Files of a policy folder that a round's start does not take: they belong to the stage that made it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="the run's recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. seed=1")
    parser.add_argument("--feedback", metavar="DB_URL", default=None,
                        help="the feedback store (a SQLite file or a database URL); default: feedback.db in the run "
                             "folder, where `rlhfchat serve` keeps it")


def main(args: argparse.Namespace) -> Path | None:
    from rlhfchat.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    return iterate(recipe, args.feedback or recipe.run_dir / "feedback.db")


# ----------------------------------------------------------------------------------------------------------------
# The rounds on disk


def rounds_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "rounds"


def read_round(run_dir: Path, k: int) -> dict[str, Any] | None:
    try:
        return json.loads((rounds_dir(run_dir) / str(k) / "round.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def existing_rounds(run_dir: Path) -> list[int]:
    """The numbers of the rounds that have a round.json, in order."""
    root = rounds_dir(run_dir)
    found = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return sorted(k for k in found if read_round(run_dir, k) is not None)


def _latest(run_dir: Path) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """(k, round k's record, round k-1's record or None) for the latest finished round k."""
    pointer = rounds_dir(run_dir) / "latest"
    try:
        k = int(pointer.read_text().strip())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        raise RlhfchatError(f"{pointer}: no finished round; run `rlhfchat iterate RECIPE.yaml` first") from None
    info, before = read_round(run_dir, k), read_round(run_dir, k - 1)
    if info is None or info.get("status") != "complete":
        raise RlhfchatError(f"{pointer}: round {k} has no finished round.json")
    return k, info, before


def latest(run_dir: str | Path) -> list[Path]:
    """[the latest finished round's policy folder, the one before it] (`rounds/latest` names the round; the one
    before round 1 is the SFT model it started from). What `rlhfchat serve` puts side by side in the arena."""
    return [path for _, path in serving(run_dir)]


def serving(run_dir: str | Path) -> list[tuple[str, Path]]:
    """The two models `rlhfchat serve --rounds RUN_DIR` puts side by side, with the names they are served under:
    [("round-K", round K's policy), ("round-(K-1)", the one before)], where the one before round 1 is "sft", the
    model it started from. The names stay the same from round to round, so the arena's votes on round-K add up
    across servings (the feedback store keeps each reply's model name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RlhfchatError(f"--rounds: {run_dir}: no such run folder")
    if read_round(run_dir, 1) is None and not (rounds_dir(run_dir) / "latest").exists():
        return _pipeline_round(run_dir)
    k, info, before = _latest(run_dir)
    return [(f"round-{k}", run_dir / info["policy"]),
            (f"round-{k - 1}" if before else "sft", run_dir / (before["policy"] if before else info["start"]))]


def _pipeline_round(run_dir: Path) -> list[tuple[str, Path]]:
    """Before the first `iterate`: round 1 is the finished pipeline's policy (the recipe's method), beside its SFT
    model, so that people can vote in the arena (and fill the feedback store iterate reads) straight after the
    pipeline, under the names the rounds keep."""
    import yaml

    try:
        method = (yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}).get("method", "ppo")
    except (OSError, yaml.YAMLError):
        method = None
    policy = run_dir / str(method)
    if method is None or (manifest.read(policy) or {}).get("status") != "complete":
        raise RlhfchatError(f"{rounds_dir(run_dir) / 'latest'}: no finished round; run `rlhfchat iterate RECIPE.yaml` "
                            "first (or finish `rlhfchat pipeline RECIPE.yaml`: its policy is round 1)")
    return [("round-1", policy), ("sft", run_dir / "sft")]


def _rel(run_dir: Path, path: Path) -> str:
    return os.path.relpath(path, run_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _write_round(run_dir: Path, k: int, info: dict[str, Any]) -> None:
    if manifest.is_main_process():
        write_json(rounds_dir(run_dir) / str(k) / "round.json", info)


def round_one(recipe: Recipe) -> dict[str, Any]:
    """Round 1's record: the finished pipeline's own folders, as they are."""
    run = recipe.run_dir
    reward = run / "reward"
    info = {"round": 1, "method": recipe.method, "status": "complete", "finished": _now(), "start": "sft",
            "policy": recipe.method, "eval": "eval", "feedback": {"since": None, "until": None},
            "reward": "reward" if (manifest.read(reward) or {}).get("status") == "complete" else None}
    _write_round(run, 1, info)
    return info


# ----------------------------------------------------------------------------------------------------------------
# The steps of a round


def snapshot(store: Any, round_dir: Path, since: str | None) -> dict[str, Any]:
    """Step 1: the feedback given after `since` (an ISO time; None: all of it), saved in round_dir/feedback/."""
    until = datetime.now(timezone.utc)
    start = datetime.fromisoformat(since) if since else None
    pairs = store.preference_records(since=start, until=until)
    unpaired = store.unpaired_records(since=start, until=until)
    write_jsonl(round_dir / "feedback" / "preferences.jsonl", pairs)
    write_jsonl(round_dir / "feedback" / "unpaired.jsonl", unpaired)
    return {"db": store.safe_url(), "since": since, "until": until.isoformat(), "preference_records": len(pairs),
            "unpaired_records": len(unpaired)}


def _weighted(records: list[Any], weight: float, seed: str) -> list[Any]:
    """A source's records under its sampling weight, by the data stage's rule (data/mixture.py)."""
    from collections import Counter

    from rlhfchat.data.mixture import weigh

    return weigh(records, weight, random.Random(seed), Counter())


def build_data(recipe: Recipe, round_dir: Path, k: int, method: str) -> dict[str, Any]:
    """Step 2: rounds/k/data/ from the run's data (of `recipe`, the run's) and the round's feedback (see the module
    docstring)."""
    run_data, out = recipe.run_dir / "data", round_dir / "data"
    fb = round_dir / "feedback"
    inputs = manifest.input_hashes(recipe.run_dir, [run_data / f"{kind}.{split}.jsonl" for kind in (
        "preferences", "prompts") for split in ("train", "eval")] + [fb / "preferences.jsonl", fb / "unpaired.jsonl"])
    w = recipe.iterate
    chash = config_hash({"preferences_weight": w.preferences_weight, "feedback_weight": w.feedback_weight,
                         "seed": recipe.seed, "method": method, "round": k})
    if manifest.is_complete(out, chash, inputs):
        return json.loads((out / "card.json").read_text())

    def prompt_key(prompt: list[dict[str, str]]) -> str:
        return json.dumps(prompt, sort_keys=True, ensure_ascii=False)

    held_out = {prompt_key(r["prompt"]) for name in ("prompts.eval.jsonl", "preferences.eval.jsonl")
                for r in read_jsonl(run_data / name)}
    recipe_pairs = list(read_jsonl(run_data / "preferences.train.jsonl", "preferences"))
    known = {record_key("preferences", r) for r in recipe_pairs}
    feedback = list(read_jsonl(fb / "preferences.jsonl", "preferences"))
    on_held_out = [r for r in feedback if prompt_key(r["prompt"]) in held_out]
    fresh = [r for r in feedback if prompt_key(r["prompt"]) not in held_out
             and record_key("preferences", r) not in known]
    thumbs = [r for r in read_jsonl(fb / "unpaired.jsonl") if prompt_key(r["prompt"]) not in held_out]
    train = (_weighted(recipe_pairs, w.preferences_weight, f"{recipe.seed}:round{k}:preferences")
             + _weighted(fresh, w.feedback_weight, f"{recipe.seed}:round{k}:feedback"))
    random.Random(f"{recipe.seed}:round{k}:shuffle").shuffle(train)
    prompts = list(read_jsonl(run_data / "prompts.train.jsonl", "prompts"))
    seen = {prompt_key(r["prompt"]) for r in prompts}
    for r in fresh + thumbs:
        if prompt_key(r["prompt"]) not in seen:
            seen.add(prompt_key(r["prompt"]))
            prompts.append({"id": r["id"], "source": "feedback", "prompt": r["prompt"]})
    card = {"round": k, "preferences_weight": w.preferences_weight, "feedback_weight": w.feedback_weight,
            "recipe_pairs": len(recipe_pairs), "feedback_pairs": len(feedback), "feedback_pairs_used": len(fresh),
            "feedback_left_out": {"held-out prompt": len(on_held_out),
                                  "already in the recipe's data": len(feedback) - len(fresh) - len(on_held_out)},
            "preferences.train": len(train), "prompts.train": len(prompts)}
    if manifest.is_main_process():
        with atomic_dir(out) as tmp:
            write_jsonl(tmp / "preferences.train.jsonl", train)
            write_jsonl(tmp / "prompts.train.jsonl", prompts)
            for name in ("preferences.eval.jsonl", "prompts.eval.jsonl"):
                shutil.copyfile(run_data / name, tmp / name)
            if method == "kto":
                from rlhfchat.train.kto import UNPAIRED

                unpaired = _weighted(thumbs, w.feedback_weight, f"{recipe.seed}:round{k}:unpaired")
                card["unpaired.train"] = write_jsonl(tmp / UNPAIRED, unpaired)
            write_json(tmp / "card.json", card)
        with manifest.running("data", out, chash, inputs):
            pass
    manifest.barrier()
    return card


def copy_start(run_dir: Path, source: Path, start: Path) -> None:
    """Step 3: `start` becomes a copy of the model folder `source` (round k's policy: weights, config, tokenizer);
    done once, checked by the source's manifest."""
    inputs = manifest.input_hashes(run_dir, [source])
    if manifest.is_complete(start, "start", inputs) or not manifest.is_main_process():
        manifest.barrier()
        return
    with atomic_dir(start) as tmp:
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
    with manifest.running("start", start, "start", inputs) as m:
        m["source"] = _rel(run_dir, source)
    manifest.barrier()


def run_round(recipe: Recipe, k: int, db: str | Path) -> dict[str, Any]:
    """Run (or resume, or skip) round k >= 2 from round k-1; returns its finished round.json."""
    from rlhfchat.eval import report
    from rlhfchat.eval import run as evaluate
    from rlhfchat.train import reward

    run = recipe.run_dir
    info = read_round(run, k)
    prev = read_round(run, k - 1)
    if prev is None or prev.get("status") != "complete":
        raise RlhfchatError(f"{rounds_dir(run) / str(k - 1)}: round {k - 1} is not finished")
    round_dir = rounds_dir(run) / str(k)
    if manifest.is_main_process():  # what a killed attempt left: `.data.*.tmp`, `.sft.*.tmp`, `.round.json.*.tmp`
        sweep(round_dir, names=("data", "sft", "round.json"))
        sweep(round_dir / "feedback")
    method = info["method"]
    sub = dataclasses.replace(recipe, name=f"{recipe.name}-round-{k}", output_dir=str(round_dir), method=method)
    print(f"\n=== round {k} ({method}, from round {k - 1}) ===", flush=True)

    # 2. data: the recipe's pairs and the round's feedback for training; the run's held-out data for evaluation.
    card = build_data(recipe, round_dir, k, method)
    print(f"[round {k}] {card['preferences.train']} training pairs ({card['feedback_pairs_used']} from feedback), "
          f"{card['prompts.train']} prompts", flush=True)
    # 3. start: a copy of round k-1's policy, the start and reference of this round's policy.
    start = round_dir / "sft"
    copy_start(run, run / prev["policy"], start)
    # 4. reward model, retrained from round k-1's (from the start's trunk when round k-1 had none).
    reward_dir = None
    if method == "ppo" or recipe.eval.win_rates:
        init = run / prev["reward"] if prev.get("reward") else None
        reward.main(sub, init=init)
        reward_dir = sub.run_dir / "reward"
    # 5. the policy: PPO against the new reward model, or DPO / KTO on the round's data.
    from rlhfchat.pipeline import DIRECT

    module = "rlhfchat.train.ppo" if method == "ppo" else DIRECT[method]
    importlib.import_module(module).main(sub)
    # 6-7. round k against round k-1, and the round's report with the arena leaderboard.
    before, after = f"round-{k - 1}", f"round-{k}"
    results = evaluate.main(sub, models=[(before, str(run / prev["policy"])), (after, str(round_dir / method))],
                            references={after: before})
    report.main(sub, feedback=db)
    rows = {r["model"]: r for r in results.get("models", [])}
    info.update(status="complete", finished=_now(), start=_rel(run, start), policy=_rel(run, round_dir / method),
                reward=_rel(run, reward_dir) if reward_dir else None, eval=_rel(run, round_dir / "eval"),
                figures={"win_rate": (results.get("win_rates", {}).get(f"{after}_vs_{before}") or {}).get("win_rate"),
                         "math_exact_match": {n: rows[n]["math_exact_match"] for n in rows}})
    _write_round(run, k, info)
    return info


def iterate(recipe: Recipe, db: str | Path) -> Path | None:
    """Round 1 (the pipeline), the rounds already begun, then one new round when there is new feedback; returns
    the folder of the round made or finished, None when there was nothing to do."""
    from rlhfchat import pipeline
    from rlhfchat.chat.feedback import FeedbackStore

    run = recipe.run_dir
    if "://" not in str(db) and not Path(db).is_file():
        raise RlhfchatError(f"--feedback: {db} does not exist; `rlhfchat serve` collects feedback there "
                            "(or give a database URL)")
    store = FeedbackStore(db, create=False)
    try:
        if manifest.is_main_process():
            sweep(rounds_dir(run), names=("latest",))
        if read_round(run, 1) is None:
            print("=== round 1: the pipeline ===", flush=True)
            pipeline.main(recipe)
            round_one(recipe)
        done: Path | None = None
        ks = existing_rounds(run)
        # A round begun before and not finished (the last call was stopped) is finished, and ends this call.
        unfinished = [k for k in ks if read_round(run, k).get("status") != "complete"]
        for k in unfinished:
            run_round(recipe, k, store.url)
            done = rounds_dir(run) / str(k)
        if not unfinished:
            # 1. feedback since the latest round's snapshot: a new round when there is enough of it.
            k = ks[-1] + 1
            round_dir = rounds_dir(run) / str(k)
            since = read_round(run, k - 1)["feedback"].get("until")
            fb = snapshot(store, round_dir, since) if manifest.is_main_process() else {}
            manifest.barrier()
            n = fb.get("preference_records", 0) + (fb.get("unpaired_records", 0) if recipe.method == "kto" else 0)
            if n < recipe.iterate.min_records:
                shutil.rmtree(round_dir, ignore_errors=True)
                print(f"[iterate] {n} new feedback records in {store.safe_url()} since round {k - 1} "
                      f"(iterate.min_records is {recipe.iterate.min_records}): no new round")
            else:
                _write_round(run, k, {"round": k, "method": recipe.method, "status": "running", "started": _now(),
                                      "feedback": fb})
                run_round(recipe, k, store.url)
                done = round_dir
        last = max(k for k in existing_rounds(run) if read_round(run, k).get("status") == "complete")
        if manifest.is_main_process():
            with atomic_file(rounds_dir(run) / "latest") as f:
                f.write(f"{last}\n")
        if done is not None:
            print(f"\n[iterate] round {last} finished: report {done / 'eval' / 'report.md'}")
            print(f"  serve it beside round {last - 1} in the arena: rlhfchat serve --rounds {run}")
        return done
    finally:
        store.close()


if __name__ == "__main__":
    import sys

    from rlhfchat.cli import main as cli_main

    sys.exit(cli_main(["iterate", *sys.argv[1:]]))
