"""Stage 5: the closing comparison of a run's models on held-out prompts and benchmarks.

    rlhfchat eval recipes/tiny-cpu.yaml [eval.prompts=64 eval.tasks=[rlhfchat_math,hellaswag] ...]

Evaluates the run's base (when there is one), SFT and PPO (or DPO, KTO) models, plus any folders in `eval.models`,
and writes `<run>/eval/`:

    results.json     one row per model (reward-model score, length, math exact match, KL to the reference for
                     PPO, DPO and KTO by three named estimators, lm-eval task scores) and the pairwise win rates
                     with bootstrap 95% intervals: by the run's own reward model (`win_rates`), and where there is
                     one, by a second judge (`win_rates_by`: the `eval.judge` reward model, exact answers on the math
                     prompts)
    replies.jsonl    every held-out prompt with each model's reply, its reward (and judge score, whether a math
                     answer is right, and under `rewards` its value of each of ppo.rewards' checks)
    manifest.json    skipped when complete for the same eval section and inputs

Steps: 1. inputs and skip  2. each model answers the held-out prompts (greedy) and runs the lm-eval tasks
3. the reward model scores every reply  4. KL(PPO || SFT) on replies sampled from PPO (the same for DPO, KTO)
5. win rates, math exact match, results.json  6. the comparison table on stdout (also when the stage is skipped).

`rlhfchat iterate` calls `main` with its own models and references: a round's policy against the round before.
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhfchat import manifest, stage
from rlhfchat.atomic import write_json
from rlhfchat.config import Recipe
from rlhfchat.data.schema import read_jsonl, write_jsonl
from rlhfchat.errors import RlhfchatError


def batch_size() -> int:
    """Prompts per generation / scoring batch: wider on CPU (tiny models, where fewer steps win), 16 on a GPU."""
    import torch

    return 16 if torch.cuda.is_available() else 32


def _is_model_folder(path: Path) -> bool:
    """A folder holding a model; a stage folder whose manifest does not say complete is refused (one line)."""
    manifest.require_complete(path)
    return (path / "config.json").is_file()


POLICY_STAGES = ("ppo", "dpo", "kto")
"""The stages that train the policy after SFT, each KL-measured against the SFT model, its reference."""


def models_to_evaluate(recipe: Recipe) -> list[tuple[str, str]]:
    """[(name, model folder or hub id)] in table order: base, sft, ppo, dpo, kto (those the run has), then
    `eval.models` (named by folder)."""
    run = recipe.run_dir
    models: list[tuple[str, str]] = []
    if recipe.base.model == "tiny":
        if _is_model_folder(run / "base"):
            models.append(("base", str(run / "base")))
    else:
        models.append(("base", _reachable(recipe.base.model, "base.model")))
    for name in ("sft", *POLICY_STAGES):
        if _is_model_folder(run / name):
            models.append((name, str(run / name)))
    names = {n for n, _ in models}
    for path in recipe.eval.models:
        path = _reachable(path, "eval.models")
        manifest.require_complete(path)
        stem = Path(path).resolve().name if Path(path).exists() else path  # a hub id is named by itself
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.add(name)
        models.append((name, str(path)))
    return models


def _reachable(path: str, field: str) -> str:
    """A model folder, or a hub id that can be loaded (checked now, before minutes of other models' replies):
    offline and not in the cache is one line naming `field`. Returned as given (the table names it so)."""
    from rlhfchat.models import resolve_model

    resolve_model(path, field)
    return path


def load_prompts(path: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` held-out prompt records (the data stage has already shuffled them)."""
    if not path.is_file():
        raise RlhfchatError(f"{path}: not found; run `rlhfchat data RECIPE.yaml` first")
    records = []
    for rec in read_jsonl(path, "prompts"):
        if len(records) == n:
            break
        records.append(rec)
    if not records:
        raise RlhfchatError(f"{path}: no held-out prompts (set data.eval_fraction above 0)")
    return records


def math_correct(prompts: list[list[dict[str, str]]], replies: list[str]) -> list[float | None]:
    """Per prompt: 1.0 when a math prompt's reply ends in its answer, 0.0 when not, None for other prompts."""
    from rlhfchat.data.samples import expected_math_answer, extract_answer
    from rlhfchat.eval.generate import last_user_text

    wants = [expected_math_answer(last_user_text(p)) for p in prompts]
    return [None if want is None else float(extract_answer(r) == want) for want, r in zip(wants, replies)]


def math_exact_match(prompts: list[list[dict[str, str]]], replies: list[str]) -> tuple[float | None, int]:
    """(share of math prompts whose reply's last integer is the answer, number of math prompts)."""
    graded = [c for c in math_correct(prompts, replies) if c is not None]
    if not graded:
        return None, 0
    return sum(graded) / len(graded), len(graded)


def _files_hash(root: Path, patterns: list[str]) -> str:
    """sha256 over the names and bytes of the files matching `patterns` under `root` (the local task definitions)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for pattern in patterns for p in root.glob(pattern)):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _release_memory() -> None:
    """Return the memory of models the caller has just `del`eted (one model is loaded at a time, two for KL)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(recipe: Recipe, models: list[tuple[str, str]] | None = None,
         references: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate `models` ([(name, folder)], default models_to_evaluate) and measure KL(model || reference) for each
    {model name: reference name} of `references` (default: ppo, dpo and kto against sft)."""
    import numpy as np

    from rlhfchat.eval import benchmarks, generate
    from rlhfchat.eval.tasks import TASKS_DIR

    run = recipe.run_dir
    stage_dir = run / "eval"
    cfg = recipe.eval
    prompts_file = run / "data" / "prompts.eval.jsonl"
    reward_dir = run / "reward"
    has_reward = cfg.win_rates and _is_model_folder(reward_dir)
    judge = _reachable(cfg.judge, "eval.judge") if cfg.judge else None

    # 1. Inputs and skip (rlhfchat/stage.py): the same eval section, seed and inputs as a finished evaluation.
    models = models_to_evaluate(recipe) if models is None else models
    names = [n for n, _ in models]
    if references is None:
        references = {stage: "sft" for stage in POLICY_STAGES}
    references = {a: b for a, b in references.items() if a in names and b in names}
    if not models:
        raise RlhfchatError(f"{run}: no finished model to evaluate (sft/, ppo/ or eval.models); "
                            f"run `rlhfchat sft RECIPE.yaml` first")
    inputs = [prompts_file, *(p for _, p in models), *([reward_dir] if has_reward else []), *([judge] if judge else [])]
    # ppo.rewards' checks (math, a user's function) grade every model's replies too; a recipe with the reward model
    # alone keeps the settings (and so the skip) it had before they existed
    checks = [c for c in recipe.ppo.rewards if c.kind != "reward_model"]
    config = {"eval": cfg, "seed": recipe.seed, "dtype": recipe.base.dtype,
              "max_prompt_length": recipe.ppo.generation.max_prompt_length,
              "local_tasks": _files_hash(TASKS_DIR, ["*.yaml", "*.py", "data/*.jsonl"]),
              "models": names, "references": references, **({"rewards": recipe.ppo.rewards} if checks else {})}

    def evaluate(m: dict) -> None:  # on rank 0 alone (stage.run: main_only); the other ranks wait
        t0 = time.perf_counter()
        manager = benchmarks.task_manager(cfg.tasks) if cfg.tasks else None
        if cfg.tasks:  # a misspelt task fails now, not after the first model's replies
            benchmarks.check_tasks(cfg.tasks, manager)
        records = load_prompts(prompts_file, cfg.prompts)
        prompts = [rec["prompt"] for rec in records]
        from rlhfchat.train.rewards import Rewards

        graders = Rewards(recipe.ppo.rewards, checks_only=True)  # a bad module:function fails before any reply
        print(f"[eval] {len(models)} models ({', '.join(n for n, _ in models)}) on {len(prompts)} held-out prompts"
              + (f" and lm-eval tasks {', '.join(cfg.tasks)}" if cfg.tasks else ""))

        # 2. Each model answers the held-out prompts (greedy, reproducible) and runs the benchmarks.
        rows: dict[str, dict[str, Any]] = {}
        replies: dict[str, list[generate.Reply]] = {}
        correct: dict[str, list[float | None]] = {}
        checked: dict[str, dict[str, list[float]]] = {}  # model -> ppo.rewards' check -> each reply's value
        bs = batch_size()
        for name, path in models:
            model, tokenizer = generate.load_causal_lm(path, recipe.base.dtype)
            replies[name] = generate.replies_to(
                model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=bs,
                seed=recipe.seed, max_prompt_length=recipe.ppo.generation.max_prompt_length, desc=f"[eval] {name}: replies")
            texts = [r.text for r in replies[name]]
            correct[name] = math_correct(prompts, texts)
            graded = graders.score(prompts, texts, records)[1]  # {component: (N,)}
            checked[name] = {k: [float(x) for x in v] for k, v in graded.items()}
            em, n_math = math_exact_match(prompts, texts)
            rows[name] = {
                "model": name, "path": path, "n_prompts": len(prompts),
                "reward_mean": None, "reward_std": None,
                "mean_length": float(np.mean([r.n_tokens for r in replies[name]])),
                "mean_chars": float(np.mean([len(t) for t in texts])),
                "stopped": float(np.mean([r.stopped for r in replies[name]])),
                "math_exact_match": em, "math_n": n_math, "kl_to_ref": None,
                "rewards": {k: float(v.mean()) for k, v in graded.items()},
                "tasks": benchmarks.run_tasks(model, cfg.tasks, tokenizer=tokenizer, limit=cfg.limit,
                                              dtype=recipe.base.dtype, seed=recipe.seed, bootstrap=cfg.bootstrap,
                                              batch_size=bs, manager=manager) if cfg.tasks else {},
            }
            del model, tokenizer
            _release_memory()

        # 3. The run's reward model scores every model's replies (one load for all), then the judge, if any.
        rewards: dict[str, list[float]] = {}
        judged: dict[str, list[float]] = {}
        if has_reward:
            # The same scorer PPO trained against: the same text, truncation and batching.
            rewards = _score(reward_dir, prompts, replies, recipe, bs)
            for name in rewards:
                rows[name].update(reward_mean=float(np.mean(rewards[name])), reward_std=float(np.std(rewards[name])))
                # each reward_model component of ppo.rewards, beside the checks, as the PPO stage logs them
                rows[name]["rewards"].update({c.name or "reward_model": rows[name]["reward_mean"]
                                              for c in recipe.ppo.rewards if c.kind == "reward_model"})
        elif not cfg.win_rates:
            print("[eval] eval.win_rates is false; reward scores and win rates left out")
        else:
            print(f"[eval] {reward_dir}: no finished reward model; reward scores and win rates left out")
        if judge:
            judged = _score(judge, prompts, replies, recipe, bs)
            for name in judged:
                rows[name].update(judge_mean=float(np.mean(judged[name])), judge_std=float(np.std(judged[name])))

        # 4. KL of each trained policy to its reference (the SFT model), on the policy's own samples.
        for name, ref in references.items():
            policy, tokenizer = generate.load_causal_lm(rows[name]["path"], recipe.base.dtype)
            reference, _ = generate.load_causal_lm(rows[ref]["path"], recipe.base.dtype)
            kl = generate.kl_to_reference(policy, reference, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                          seed=recipe.seed, batch_size=bs,
                                          max_prompt_length=recipe.ppo.generation.max_prompt_length,
                                          desc=f"[eval] KL({name}||{ref})")
            rows[name].update(kl_to_ref=kl["kl"], kl_estimator="k1", kl_per_token=kl["kl_per_token"],
                              kl_k3=kl["kl_k3"], kl_trlx=kl["kl_trlx"], kl_reference=ref)
            del policy, reference, tokenizer
            _release_memory()

        # 5. Win rates of every later model over every earlier one (each policy over its reference first), and the
        #    files.
        pairs = [(a, b) for j, a in enumerate(names) for b in names[:j]]
        pairs.sort(key=lambda ab: ab not in references.items())
        win_rates = _win_rates(pairs, rewards, cfg.bootstrap, recipe.seed)
        # the second judges: the independent reward model, and exact answers on the math prompts (those only)
        math = [i for i, c in enumerate(correct[names[0]]) if c is not None] if names else []
        win_rates_by = {"judge": _win_rates(pairs, judged, cfg.bootstrap, recipe.seed),
                        "math_exact_match": _win_rates(pairs, {n: [correct[n][i] for i in math] for n in names}
                                                       if math else {}, cfg.bootstrap, recipe.seed)}
        results = {
            "run": recipe.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {"prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                         "tasks": list(cfg.tasks), "limit": cfg.limit, "bootstrap": cfg.bootstrap,
                         "seed": recipe.seed, "reward_model": str(reward_dir) if has_reward else None,
                         "judge": judge, "math_prompts": len(math),
                         "checks": [name for name, _, _ in graders.components]},
            "models": [rows[n] for n in names],
            "baseline": next(iter(references.values()), "sft"),
            "win_rates": win_rates,
            "win_rates_by": {k: v for k, v in win_rates_by.items() if v},
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        write_jsonl(stage_dir / "replies.jsonl", (
            {"id": rec["id"], "source": rec.get("source"), "prompt": rec["prompt"],
             "replies": {n: {"text": replies[n][i].text, "n_tokens": replies[n][i].n_tokens,
                             "reward": rewards[n][i] if rewards else None,
                             **({"judge": judged[n][i]} if judged else {}),
                             **({"rewards": {k: v[i] for k, v in checked[n].items()}} if checked[n] else {}),
                             **({"correct": correct[n][i]} if correct[n][i] is not None else {})} for n in names}}
            for i, rec in enumerate(records)))
        write_json(stage_dir / "results.json", results)
        m["models"] = names
        print(f"[eval] results in {stage_dir / 'results.json'} ({results['wall_seconds']:.0f}s)")

    results = stage.run(recipe, "eval", inputs=inputs, config=config, body=evaluate, result="results.json",
                        main_only=True)
    # 6. The comparison, printed.
    if manifest.is_main_process():
        print(format_table(results))
    return results


def _score(path: str | Path, prompts: list, replies: dict[str, list], recipe: Recipe, bs: int) -> dict[str, list[float]]:
    """Every model's replies scored by the reward model at `path` (RewardScorer, as PPO scores): {model: scores}."""
    from rlhfchat.eval import generate
    from rlhfchat.models import torch_dtype
    from rlhfchat.train.reward import RewardScorer

    scorer = RewardScorer(path, dtype=torch_dtype(recipe.base.dtype),
                          batch_size=bs, device=generate.device_for())
    scores = {name: scorer.score(prompts, [r.text for r in rs]).tolist() for name, rs in replies.items()}
    del scorer
    _release_memory()
    return scores


def _win_rates(pairs: list[tuple[str, str]], scores: dict[str, list[float]], iters: int,
               seed: int) -> dict[str, dict[str, Any]]:
    """{"a_vs_b": {"a", "b", win_rate, ci95, n, wins, ties, losses}} for each pair, from paired scores."""
    from rlhfchat.eval import winrate

    return {f"{a}_vs_{b}": {"a": a, "b": b, **winrate.win_rate(scores[a], scores[b], iters, seed)}
            for a, b in pairs if scores}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table plus one line per win rate (what `rlhfchat eval` prints)."""
    rows = results["models"]
    tasks = list(results["settings"].get("tasks") or [])
    task_cols = sorted({t for r in rows for t in r.get("tasks", {})}, key=lambda t: tasks.index(t) if t in tasks
                       else len(tasks))
    has_judge = any(r.get("judge_mean") is not None for r in rows)
    checks = list(results["settings"].get("checks") or [])  # ppo.rewards' math and function components
    head = ["model", "reward", "±sd", *(["judge"] if has_judge else []), "length", "math EM", "KL k1", "KL trlX",
            *checks, *task_cols]
    table = [head]
    for r in rows:
        cells = [r["model"], _fmt(r["reward_mean"]), _fmt(r["reward_std"]),
                 *([_fmt(r.get("judge_mean"))] if has_judge else []), _fmt(r["mean_length"], ".1f"),
                 (f"{round(r['math_exact_match'] * r['math_n'])}/{r['math_n']}" if r.get("math_n")
                  and r.get("math_exact_match") is not None else _fmt(r["math_exact_match"])),
                 _fmt(r.get("kl_to_ref")), _fmt(r.get("kl_trlx")), *(_fmt(r.get("rewards", {}).get(c)) for c in checks)]
        for t in task_cols:
            s = r.get("tasks", {}).get(t, {})
            cells.append("error" if "error" in s else _fmt(s.get("score")))
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [(f"held-out prompts: {results['settings']['prompts']}  (reward: the run's reward model's score, the "
              "model the RL stage trains against" + ("; judge: eval.judge's score" if has_judge else "") + "; length: "
              "reply tokens; math EM: exact answers / math prompts; KL to the reference per reply: k1 = sum of "
              "log-ratios, trlX = sum of e^r-1-r as PPO logs it"
              + (f"; {', '.join(checks)}: ppo.rewards' checks, mean per reply" if checks else "") + ")")]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    judges = [("by the run's reward model", results.get("win_rates", {})),
              *((f"by {k.replace('_', ' ')}", v) for k, v in results.get("win_rates_by", {}).items())]
    for by, rates in judges:
        for w in rates.values():
            lo, hi = w["ci95"]
            lines.append(f"win rate {w['a']} over {w['b']} {by}: {w['win_rate']:.3f}  95% CI [{lo:.3f}, {hi:.3f}]  "
                         f"(n={w['n']}: {w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
