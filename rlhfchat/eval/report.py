"""Stage 6: `<run>/eval/report.md` with the comparison tables, training plots and answers side by side.

    rlhfchat report recipes/tiny-cpu.yaml

Reads `<run>/eval/results.json` and `replies.jsonl` (written by `rlhfchat eval`) and each stage's `metrics.jsonl`
and `metrics.json`, draws PNG plots beside the report (eval/plots.py), writes `samples.md` (every held-out reply,
sorted by the change in reward: eval/examples.py) and prints the report's path. Cheap, so it is written afresh every
time. Plots:

    comparison.png            reward-model scores per model (box) and win rates with 95% intervals, by each judge
    sft_loss.png              SFT training loss (and held-out loss) over steps
    reward_accuracy.png       reward-model pairwise accuracy over steps (and held-out accuracy)
    ppo_score.png  ppo_kl.png  ppo_entropy.png  ppo_clipfrac.png  ppo_value_loss.png  ppo_response_length.png
    ppo_reward_vs_kl.png      PPO, per iteration
    dpo_margin.png  kto_margin.png    DPO's / KTO's implicit reward margin over steps (and held-out)

So that it cannot mislead: each KL figure names its estimator (eval/kl.py), the same in plots and tables; win rates
say who judged them (the run's own reward model, which PPO was trained against, beside an independent `eval.judge`
and exact answers where they exist); the PPO stage's own held-out figures are set beside eval's with what differs.

When the run has a feedback store with arena votes (`feedback.db` in the run folder, where `rlhfchat serve` keeps
it, or the store `main` is given), the report ends its comparison with the arena leaderboard: Bradley-Terry
ratings on the Elo scale with bootstrap intervals (eval/leaderboard.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfchat import manifest
from rlhfchat.config import Recipe
from rlhfchat.errors import RlhfchatError
from rlhfchat.eval import examples, plots
from rlhfchat.eval.examples import cell as _cell
from rlhfchat.eval.examples import num as _num
from rlhfchat.eval.kl import LABELS as KL_LABELS

# (file, stage, title, y label, [(series label, candidate keys in metrics.jsonl)])
TRAINING_PLOTS = [
    ("sft_loss.png", "sft", "SFT loss", "cross-entropy (assistant tokens)",
     [("train", ["loss", "train_loss"]), ("held-out", ["eval_loss"])]),
    ("reward_accuracy.png", "reward", "Reward model accuracy", "share of pairs ranked right",
     [("train", ["accuracy", "rewards/accuracies"]), ("held-out", ["eval_accuracy"])]),
    ("ppo_score.png", "ppo", "PPO reward-model score", "mean score of rollouts",
     [("score", ["score", "reward", "scores", "ppo/score"])]),
    ("ppo_kl.png", "ppo", "PPO: KL to the reference (SFT), trlX's estimator as PPO logs it",
     "Σ (e^r − 1 − r) per reply, r = log π − log π_ref", [("training rollouts", ["kl", "mean_kl", "ppo/kl"])]),
    ("ppo_entropy.png", "ppo", "PPO policy entropy", "nats per reply token (rollouts)",
     [("entropy", ["entropy", "policy/entropy"])]),
    ("ppo_clipfrac.png", "ppo", "PPO clip fractions", "share of reply tokens whose loss is clipped",
     [("policy: ratio beyond 1 ± cliprange", ["clipfrac", "policy/clipfrac"]),
      ("value: beyond old value ± cliprange_value", ["value_clipfrac", "vf_clipfrac"])]),
    ("ppo_value_loss.png", "ppo", "PPO value loss", "clipped value loss",
     [("value loss", ["value_loss", "vf_loss", "loss/value"])]),
    ("ppo_response_length.png", "ppo", "PPO response length", "tokens per reply",
     [("length", ["response_length", "response_len", "mean_response_length"])]),
    ("dpo_margin.png", "dpo", "DPO implicit reward margin", "beta x log-ratio, chosen minus rejected",
     [("train", ["rewards/margins"]), ("held-out", ["eval_rewards/margins"])]),
    ("kto_margin.png", "kto", "KTO implicit reward margin", "beta x log-ratio, desirable minus undesirable",
     [("train", ["rewards/margins"]), ("held-out", ["eval_rewards/margins"])]),
]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a stage's metrics.jsonl (missing file: none; a torn last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict[str, Any]], keys: list[str]) -> tuple[list[float], list[float]]:
    """(steps, values) of the first of `keys` present in `rows` (a line without "step" uses its index)."""
    for key in keys:
        points = [(float(r.get("step", i)), float(r[key])) for i, r in enumerate(rows)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            return [p[0] for p in points], [p[1] for p in points]
    return [], []


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _flipped(w: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """A win rate stored as `b over model`, turned into `model over b`."""
    if w is not None and w["a"] != model:
        w = {**w, "a": model, "b": w["a"], "win_rate": 1 - w["win_rate"], "ci95": [1 - w["ci95"][1], 1 - w["ci95"][0]],
             "wins": w["losses"], "losses": w["wins"]}
    return w


def _vs(rates: dict[str, Any], model: str, baseline: str) -> str:
    """`model`'s win rate over `baseline` with its interval, as a table cell."""
    w = _flipped(rates.get(f"{model}_vs_{baseline}") or rates.get(f"{baseline}_vs_{model}"), model)
    return "–" if w is None else f"{w['win_rate']:.3f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]"


def _comparison_table(results: dict[str, Any]) -> list[str]:
    rows = results["models"]
    tasks = [t for t in results["settings"].get("tasks") or [] if any(t in r.get("tasks", {}) for r in rows)]
    judge = results["settings"].get("judge")
    by = results.get("win_rates_by", {})
    baseline = results.get("baseline", "sft")
    vs = "SFT" if baseline == "sft" else baseline
    head = ["model", "reward (mean ± sd), run's reward model", f"win rate vs {vs}, run's reward model",
            *(["score by eval.judge (mean ± sd)", f"win rate vs {vs}, eval.judge"] if judge else []),
            "mean length (tokens)", "math exact match", f"KL to reference: {KL_LABELS['k1']}",
            f"KL to reference: {KL_LABELS['trlx']}", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"**{r['model']}**",
                 "–" if r["reward_mean"] is None else f"{r['reward_mean']:.3f} ± {r['reward_std']:.3f}",
                 _vs(results.get("win_rates", {}), r["model"], baseline)]
        if judge:
            cells += ["–" if r.get("judge_mean") is None else f"{r['judge_mean']:.3f} ± {r['judge_std']:.3f}",
                      _vs(by.get("judge", {}), r["model"], baseline)]
        cells += [_num(r["mean_length"], ".1f"),
                  "–" if r["math_exact_match"] is None else f"{r['math_exact_match']:.3f} (n={r['math_n']})",
                  _num(r.get("kl_to_ref")), _num(r.get("kl_trlx"))]
        for t in tasks:
            s = r.get("tasks", {}).get(t, {})
            cells.append("error" if "error" in s else (
                f"{s['score']:.3f}" + (f" ± {s['stderr']:.3f}" if s.get("stderr") else "") if s.get("score") is not None
                else "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _win_rate_table(results: dict[str, Any]) -> list[str]:
    """Every pair's win rate by each judge, side by side, with what each judge is."""
    s, own, by = results["settings"], results.get("win_rates", {}), results.get("win_rates_by", {})
    if not own:
        return []
    judges = [("the run's reward model", own)]
    if by.get("judge"):
        judges.append((f"eval.judge (`{s['judge']}`)", by["judge"]))
    if by.get("math_exact_match"):
        judges.append((f"exact answers ({s.get('math_prompts')} math prompts)", by["math_exact_match"]))
    md = ["### Win rates, by judge", "",
          ("*The run's reward model* is the one PPO was trained to please: its verdict on PPO is not independent "
           "(a policy can learn what this model overrates). ")
          + ("*eval.judge* is a reward model from outside this run. " if by.get("judge") else
             "No independent judge was given: set `eval.judge` to a reward model folder or hub id from outside this "
             "run to see one beside it. ")
          + ("*Exact answers* count, on the math prompts only, a right final answer against a wrong one (both right "
             "or both wrong: a tie)." if by.get("math_exact_match") else ""), "",
          "| | " + " | ".join(f"by {name}" for name, _ in judges) + " |", "|---|" + "---|" * len(judges)]
    for key, w in own.items():
        cells = []
        for _, rates in judges:
            v = rates.get(key)
            cells.append("–" if v is None else f"{v['win_rate']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]; "
                                               f"{v['wins']} / {v['ties']} / {v['losses']} of {v['n']}")
        md.append(f"| **{w['a']}** over **{w['b']}** | " + " | ".join(cells) + " |")
    return md + ["", "Each cell: win rate (ties count half) [paired bootstrap 95% interval]; wins / ties / losses of "
                 "the prompts judged.", ""]


def _reconcile(results: dict[str, Any], ppo: dict[str, Any], recipe: Recipe) -> list[str]:
    """The PPO stage's own held-out figures (ppo/metrics.json) beside eval's, and what differs between them."""
    if ppo.get("eval_reward_after") is None:
        return []
    rows = {r["model"]: r for r in results["models"]}
    s, cfg = results["settings"], recipe.ppo.generation

    def reward(mean: Any, std: Any) -> str:
        return "–" if mean is None else f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"

    sampled = f"sampled, one per prompt (temperature {cfg.temperature:g}, top_k {cfg.top_k}, top_p {cfg.top_p:g}: " \
              f"as in the rollouts)"
    n_ppo, n_eval = ppo.get("eval_prompts"), s["prompts"]
    same_prompts = n_ppo == n_eval
    table = [
        "| | the PPO stage (`ppo/metrics.json`) | this evaluation |", "|---|---|---|",
        f"| SFT model's reward (before PPO) | {reward(ppo.get('eval_reward_before'), ppo.get('eval_reward_std_before'))}"
        f" | {reward(rows.get('sft', {}).get('reward_mean'), rows.get('sft', {}).get('reward_std'))} |",
        f"| PPO model's reward | {reward(ppo.get('eval_reward_after'), ppo.get('eval_reward_std_after'))} | "
        f"{reward(rows.get('ppo', {}).get('reward_mean'), rows.get('ppo', {}).get('reward_std'))} |",
        f"| replies | {sampled} | {s.get('decoding', 'greedy')}, the most likely token at each step |",
        f"| prompts | the first {n_ppo} of `data/prompts.eval.jsonl` | the first {n_eval} of the same file |",
        f"| reply length | at most {cfg.max_new_tokens} new tokens | at most {s['max_new_tokens']} new tokens |",
        f"| KL to SFT | {KL_LABELS['trlx']}, on the last iteration's training rollouts: {_num(ppo.get('kl'))} | "
        f"the same estimator on replies sampled for the held-out prompts: {_num(rows.get('ppo', {}).get('kl_trlx'))}"
        f"; {KL_LABELS['k1']}: {_num(rows.get('ppo', {}).get('kl_to_ref'))} |",
    ]
    differs = ["how the replies are drawn (sampled there, greedy here)"]
    if not same_prompts:
        differs.append(f"the number of prompts ({n_ppo} there, {n_eval} here; the first "
                       f"{min(n_ppo or 0, n_eval)} are the same)")
    if cfg.max_new_tokens != s["max_new_tokens"]:
        differs.append(f"the reply length allowed ({cfg.max_new_tokens} there, {s['max_new_tokens']} here)")
    return ["### The PPO stage's own held-out figures, and these", "",
            ("The PPO stage scores held-out replies before and after training too, with the same reward model; its "
             "figures differ from this table's because of " + "; ".join(differs) + ". A sampled reply takes "
             "unlikely tokens that a greedy one never does, so the two columns measure the same models on different "
             "replies, and only the changes within a column compare. Its KL is logged on training prompts with "
             "trlX's estimator, which is not an estimate of the KL (its mean is χ² − KL), so it is set beside the same "
             "estimator here."), "", *table, ""]


def _benchmark_table(results: dict[str, Any]) -> list[str]:
    lines = ["| model | task | metric | score | stderr | items |", "|---|---|---|---|---|---|"]
    for r in results["models"]:
        for task, s in r.get("tasks", {}).items():
            if "error" in s:
                lines.append(f"| {r['model']} | {task} | – | {_cell(s['error'])} | – | – |")
                continue
            metric = s["metric"] + (f" ({s['filter']})" if s.get("filter") else "")
            lines.append(f"| {r['model']} | {task} | {metric} | {_num(s['score'])} | {_num(s.get('stderr'))} "
                         f"| {s.get('n', '–')} |")
    return lines


def _leaderboard(db: str | Path, bootstrap: int, seed: int) -> list[str]:
    """The arena leaderboard section from a feedback store, or nothing when it has no votes between two models."""
    try:
        from rlhfchat.chat.feedback import FeedbackStore, arena_leaderboard
    except ImportError:  # the chat extra (sqlalchemy) is not installed
        return []
    store = FeedbackStore(db, create=False)
    try:
        rows = arena_leaderboard(store, bootstrap, seed)
        url = store.safe_url()
    finally:
        store.close()
    if not rows:
        return []
    lines = ["## Arena leaderboard", "",
             (f"From the arena votes in `{url}`: Bradley-Terry ratings on the Elo scale (400 points: 10 to 1 odds; "
              f"mean 1000) with 95% intervals from {bootstrap} bootstrap resamples of the votes, as FastChat's "
              "Chatbot Arena computes them. Ties and \"both bad\" count half a win each."), "",
             "| rank | model | rating | 95% interval | battles | wins / ties / losses |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | **{_cell(r.model)}** | {r.rating:.0f} | [{r.lower:.0f}, {r.upper:.0f}] | {r.battles} "
                     f"| {r.wins} / {r.ties} / {r.losses} |")
    return lines + [""]


def main(recipe: Recipe, feedback: str | Path | None = None) -> Path:
    """Write `<run>/eval/report.md` and `samples.md`; `feedback` is the store of the arena leaderboard (default: the
    run's feedback.db when there is one)."""
    from rlhfchat.atomic import atomic_file

    run = recipe.run_dir
    eval_dir = run / "eval"
    manifest.sweep(eval_dir)  # a killed report's report.md.*.tmp
    results_file = eval_dir / "results.json"
    if not results_file.is_file():
        raise RlhfchatError(f"{results_file}: not found; run `rlhfchat eval RECIPE.yaml` first")
    results = json.loads(results_file.read_text())
    replies_file = eval_dir / "replies.jsonl"
    replies = [json.loads(ln) for ln in replies_file.read_text().splitlines() if ln] if replies_file.is_file() else []

    # 1. Plots: the comparison, then each training curve that its stage logged.
    drawn: dict[str, Path] = {}
    if replies and plots.plot_comparison(eval_dir / "comparison.png", results, replies):
        drawn["comparison.png"] = eval_dir / "comparison.png"
    ppo_row = next((r for r in results["models"] if r["model"] == "ppo"), {})
    ppo_log = read_metrics(run / "ppo" / "metrics.jsonl")
    for file, stage, title, ylabel, wanted in TRAINING_PLOTS:
        rows = ppo_log if stage == "ppo" else read_metrics(run / stage / "metrics.jsonl")
        lines = [(label, *series(rows, keys)) for label, keys in wanted]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            marks = _kl_marks(ppo_row, lines) if file == "ppo_kl.png" else []
            plots.plot_training(eval_dir / file, title, ylabel, lines, marks)
            drawn[file] = eval_dir / file
    # ppo.rewards' components, each unweighted as the PPO stage logs it (`rewards/<name>`; `score` is their weighted sum)
    components = sorted({k for row in ppo_log for k in row if k.startswith("rewards/")})
    if components:
        plots.plot_training(eval_dir / "ppo_rewards.png", "PPO: each reward component (ppo.rewards)",
                            "mean over the rollouts, before its weight",
                            [(k.split("/", 1)[1], *series(ppo_log, [k])) for k in components])
        drawn["ppo_rewards.png"] = eval_dir / "ppo_rewards.png"
    steps, kls = series(ppo_log, ["kl"])
    if steps and len(series(ppo_log, ["score"])[0]) == len(steps):
        plots.plot_reward_vs_kl(eval_dir / "ppo_reward_vs_kl.png", steps, kls, series(ppo_log, ["score"])[1],
                                f"KL to the reference per reply, {KL_LABELS['trlx']}")
        drawn["ppo_reward_vs_kl.png"] = eval_dir / "ppo_reward_vs_kl.png"

    # 2. The report.
    s = results["settings"]
    md = [f"# rlhfchat report: {recipe.name}", "",
          f"Run folder `{run}`; evaluated {results['created']}. Models: "
          + ", ".join(f"**{r['model']}** (`{r['path']}`)" for r in results["models"]) + ".", "",
          f"## Comparison on {s['prompts']} held-out prompts", "",
          (f"Replies are greedy, at most {s['max_new_tokens']} new tokens, cut at the stop sequence. *reward*: the "
           "score of each reply by the run's own reward model, the one PPO was trained against; *win rate*: share of "
           f"prompts where the model's reply scores above the {results.get('baseline', 'sft')} model's (ties count "
           "half), with a paired bootstrap 95% interval; *math exact match*: the last number of the reply equals the "
           "answer, on the math prompts; *KL to reference*: KL(model ‖ the model it was trained from) per reply on "
           "replies sampled from the model (temperature 1), by two estimators (r: a token's log-ratio "
           "log π − log π_ref): k1 estimates the KL without bias; trlX's is what the PPO stage logs and its KL "
           "controller reads, and averages to χ² − KL rather than to the KL. Task columns: lm-eval scores (see "
           "below)."), "",
          *_comparison_table(results), "", *_win_rate_table(results)]
    if "comparison.png" in drawn:
        md += ["![reward scores and win rates by judge](comparison.png)", ""]
    md += _reconcile(results, _read_json(run / "ppo" / "metrics.json"), recipe)
    if feedback is None and (run / "feedback.db").is_file():
        feedback = run / "feedback.db"
    if feedback is not None:
        md += _leaderboard(feedback, recipe.eval.bootstrap, recipe.seed)
    if any(r.get("tasks") for r in results["models"]):
        md += ["## Benchmarks (lm-eval)", "",
               ("lm-eval's own scores; the local tasks (rlhfchat_*) run with the chat template, other tasks as "
                "lm-eval runs them by default. ") + (f"At most {s['limit']} items per task." if s.get("limit")
                                                   else "All items of each task."), "",
               *_benchmark_table(results), ""]
    md += ["## Training", ""]
    for file, stage, title, _, _ in TRAINING_PLOTS:
        if file in drawn:
            md += [f"![{title}]({file})", ""]
    if "ppo_rewards.png" in drawn:
        md += ["![PPO: each reward component (ppo.rewards)](ppo_rewards.png)", ""]
    if "ppo_reward_vs_kl.png" in drawn:
        md += ["![PPO: reward-model score against KL](ppo_reward_vs_kl.png)", ""]
    final = {stage: _read_json(run / stage / "metrics.json") for stage in ("sft", "reward", "ppo", "dpo", "kto")}
    facts = [f"{stage}: " + ", ".join(f"{k} {_num(v, '.4g')}" for k, v in m.items() if isinstance(v, (int, float))
                                     and not isinstance(v, bool))
             for stage, m in final.items() if m]
    if facts:
        md += ["Final figures (each stage's metrics.json):", "", *(f"- {f}" for f in facts), ""]
    if not any(f in drawn for f, *_ in TRAINING_PLOTS):
        md += ["No stage logged per-step metrics (metrics.jsonl) in this run folder.", ""]
    if replies:
        md += _examples(replies, results)
        with atomic_file(eval_dir / "samples.md") as f:
            f.write(examples.samples_markdown(recipe.name, replies, results))

    report = eval_dir / "report.md"
    with atomic_file(report) as f:
        f.write("\n".join(md).rstrip() + "\n")
    print(f"[report] {len(drawn)} plots; report written to {report}")
    return report


def _kl_marks(ppo_row: dict[str, Any], lines: list) -> list[tuple[str, float, float]]:
    """eval's KL of the final PPO model on held-out samples, at the last logged step: trlX's estimator (the plotted
    one) and k1, so the plot and the table show the same figures."""
    last = max(lines[0][1])
    return [(f"eval (held-out), {name}", last, ppo_row[key]) for name, key in (("trlX's estimator", "kl_trlx"),
                                                                                ("k1", "kl_to_ref"))
            if ppo_row.get(key) is not None]


def _examples(replies: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """The prompts whose reward changed most each way, answered side by side; all of them are in samples.md."""
    names = [r["model"] for r in results["models"]]
    pair = examples.change_pair(results)
    picked = examples.shown(replies, pair)
    how = (f"the largest rises and falls of the reward from **{pair[1]}** to **{pair[0]}** (by the run's reward "
           "model)" if pair and picked and picked[0][0] else "the first prompts")
    md = ["## Held-out prompts, answered side by side", "",
          f"{len(picked)} of {len(replies)}: {how}. All {len(replies)}, sorted by that change, are in "
          "[samples.md](samples.md) (and machine-readable in `replies.jsonl`).", ""]
    for n, (kind, rec) in enumerate(picked, 1):
        md += examples.render(rec, names, f"{n}. " + {"rise": "▲ ", "fall": "▼ "}.get(kind, ""), pair)
    return md


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
