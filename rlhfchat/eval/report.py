"""Stage 6: `<run>/eval/report.md` with the comparison tables, training plots and answers side by side.

    rlhfchat report recipes/tiny-cpu.yaml

Reads `<run>/eval/results.json` and `replies.jsonl` (written by `rlhfchat eval`) and each stage's `metrics.jsonl`,
draws PNG plots beside the report (matplotlib, no display needed) and prints the report's path. Cheap, so it is
written afresh every time. Plots:

    comparison.png            reward-model scores per model (box) and win rates with their 95% intervals
    sft_loss.png              SFT training loss (and held-out loss) over steps
    reward_accuracy.png       reward-model pairwise accuracy over steps (and held-out accuracy)
    ppo_score.png  ppo_kl.png  ppo_value_loss.png  ppo_response_length.png      PPO, per iteration
    dpo_margin.png  kto_margin.png    DPO's / KTO's implicit reward margin over steps (and held-out)

When the run has a feedback store with arena votes (`feedback.db` in the run folder, where `rlhfchat serve` keeps
it, or the store `main` is given), the report ends its comparison with the arena leaderboard: Bradley-Terry
ratings on the Elo scale with bootstrap intervals (eval/leaderboard.py).
"""

from __future__ import annotations

import html
import json
import unicodedata
from pathlib import Path
from typing import Any

from rlhfchat import manifest
from rlhfchat.config import Recipe
from rlhfchat.errors import RlhfchatError

# (file, stage, title, y label, [(series label, candidate keys in metrics.jsonl)])
TRAINING_PLOTS = [
    ("sft_loss.png", "sft", "SFT loss", "cross-entropy (assistant tokens)",
     [("train", ["loss", "train_loss"]), ("held-out", ["eval_loss"])]),
    ("reward_accuracy.png", "reward", "Reward model accuracy", "share of pairs ranked right",
     [("train", ["accuracy", "rewards/accuracies"]), ("held-out", ["eval_accuracy"])]),
    ("ppo_score.png", "ppo", "PPO reward-model score", "mean score of rollouts",
     [("score", ["score", "reward", "scores", "ppo/score"])]),
    ("ppo_kl.png", "ppo", "PPO KL to the reference", "KL per reply (nats)",
     [("KL", ["kl", "mean_kl", "objective/kl", "ppo/kl"])]),
    ("ppo_value_loss.png", "ppo", "PPO value loss", "clipped value loss",
     [("value loss", ["value_loss", "vf_loss", "loss/value"])]),
    ("ppo_response_length.png", "ppo", "PPO response length", "tokens per reply",
     [("length", ["response_length", "response_len", "mean_response_length"])]),
    ("dpo_margin.png", "dpo", "DPO implicit reward margin", "beta x log-ratio, chosen minus rejected",
     [("train", ["rewards/margins"]), ("held-out", ["eval_rewards/margins"])]),
    ("kto_margin.png", "kto", "KTO implicit reward margin", "beta x log-ratio, desirable minus undesirable",
     [("train", ["rewards/margins"]), ("held-out", ["eval_rewards/margins"])]),
]
EXAMPLES = 4
"""Held-out prompts shown answered side by side (one of each skill first, when the sample skills are there)."""


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


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.set_title(title, fontsize=12)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def plot_training(out: Path, title: str, ylabel: str, lines: list[tuple[str, list[float], list[float]]]) -> None:
    """One metric over steps: each series as points (few) or a faint raw line plus its moving average (many)."""
    plt, fig, ax = _figure(title)
    for k, (label, xs, ys) in enumerate(lines):
        color = f"C{k}"
        if len(xs) == 1:  # a single figure (e.g. the held-out value at the end)
            ax.scatter(xs, ys, color=color, s=60, marker="D", zorder=3, label=f"{label}: {ys[0]:.3g}")
        elif len(xs) > 40:
            window = max(3, len(xs) // 20)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
            ax.plot(xs, _moving_average(ys, window), color=color, linewidth=2,
                    label=f"{label} (moving average of {window})")
        else:
            ax.plot(xs, ys, color=color, marker="o", markersize=4, linewidth=1.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_comparison(out: Path, results: dict[str, Any], replies: list[dict[str, Any]]) -> bool:
    """Reward-score distribution per model and the win rates with 95% intervals; False when there are no rewards."""
    names = [r["model"] for r in results["models"]]
    scores = [[rec["replies"][n]["reward"] for rec in replies if rec["replies"].get(n, {}).get("reward") is not None]
              for n in names]
    if not any(scores):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = results.get("win_rates", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110, gridspec_kw={"width_ratios": [1, 1.2]})
    left.boxplot(scores, tick_labels=names, showmeans=True)
    left.set_title("Reward-model score of each model's replies", fontsize=11)
    left.set_ylabel("score")
    left.grid(True, axis="y", alpha=0.3)
    labels = [f"{w['a']} over {w['b']}" for w in wins.values()]
    rates = [w["win_rate"] for w in wins.values()]
    lo = [w["win_rate"] - w["ci95"][0] for w in wins.values()]
    hi = [w["ci95"][1] - w["win_rate"] for w in wins.values()]
    ys = list(range(len(labels)))[::-1]
    right.barh(ys, rates, height=0.5, xerr=[lo, hi], color=[f"C{i}" for i in range(len(rates))], alpha=0.8,
               capsize=6)
    right.axvline(0.5, color="black", linestyle="--", linewidth=1)
    for y, r, w in zip(ys, rates, wins.values()):
        right.text(0.01, y + 0.3, f"{r:.2f}  [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]", fontsize=9)
    right.set_yticks(ys, labels)
    right.set_ylim(-0.7, max(len(ys), 1) - 0.2)
    right.set_xlim(0, 1)
    right.set_xlabel("win rate (ties count half), 95% bootstrap interval")
    right.set_title("Win rates by reward-model preference", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    """A table cell: control characters dropped, HTML-escaped, pipes escaped, newlines as <br>."""
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c) != "Cc")
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or "&nbsp;"


def _num(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _comparison_table(results: dict[str, Any]) -> list[str]:
    rows = results["models"]
    tasks = [t for t in results["settings"].get("tasks") or [] if any(t in r.get("tasks", {}) for r in rows)]
    vs = results.get("win_rates", {})
    baseline = results.get("baseline", "sft")
    head = ["model", "reward (mean ± sd)", f"win rate vs {'SFT' if baseline == 'sft' else baseline}",
            "mean length (tokens)", "math exact match", "KL to reference", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        w = vs.get(f"{r['model']}_vs_{baseline}") or vs.get(f"{baseline}_vs_{r['model']}")
        if w is not None and w["a"] != r["model"]:  # stored as the baseline over this model: flip it
            w = {**w, "win_rate": 1 - w["win_rate"], "ci95": [1 - w["ci95"][1], 1 - w["ci95"][0]]}
        cells = [f"**{r['model']}**",
                 "–" if r["reward_mean"] is None else f"{r['reward_mean']:.3f} ± {r['reward_std']:.3f}",
                 "–" if w is None else f"{w['win_rate']:.3f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]",
                 _num(r["mean_length"], ".1f"),
                 "–" if r["math_exact_match"] is None else f"{r['math_exact_match']:.3f} (n={r['math_n']})",
                 _num(r.get("kl_to_ref"))]
        for t in tasks:
            s = r.get("tasks", {}).get(t, {})
            cells.append("error" if "error" in s else (
                f"{s['score']:.3f}" + (f" ± {s['stderr']:.3f}" if s.get("stderr") else "") if s.get("score") is not None
                else "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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


def pick_examples(replies: list[dict[str, Any]], k: int = EXAMPLES) -> list[dict[str, Any]]:
    """Up to `k` held-out prompts: the first of each sample skill (math, code, grammar), then the next ones."""
    from rlhfchat.data.samples import skill_of
    from rlhfchat.eval.generate import last_user_text

    chosen: list[int] = []
    seen: set[str] = set()
    for i, rec in enumerate(replies):
        skill = skill_of(last_user_text(rec["prompt"]))
        if skill and skill not in seen:
            seen.add(skill)
            chosen.append(i)
    chosen += [i for i in range(len(replies)) if i not in chosen]
    return [replies[i] for i in sorted(chosen[:k])]


def _examples(replies: list[dict[str, Any]], names: list[str]) -> list[str]:
    lines = []
    for n, rec in enumerate(pick_examples(replies), 1):
        turns = [f"{m['role']}: {m['content']}" for m in rec["prompt"] if m["role"] != "system"]
        prompt = turns[-1].removeprefix("user: ") if len(turns) == 1 else "\n".join(turns)
        lines += [f"### {n}. {_cell(prompt.splitlines()[0][:100])}", ""]
        if len(turns) > 1 or "\n" in prompt:
            lines += ["```text", prompt, "```", ""]
        lines += ["| | " + " | ".join(f"**{m}**" for m in names) + " |", "|---|" + "---|" * len(names)]
        lines.append("| reply | " + " | ".join(_cell(rec["replies"][m]["text"]) for m in names) + " |")
        lines.append("| reward | " + " | ".join(_num(rec["replies"][m].get("reward")) for m in names) + " |")
        lines.append("")
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
    """Write `<run>/eval/report.md`; `feedback` is the store of the arena leaderboard (default: the run's
    feedback.db when there is one)."""
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
    names = [r["model"] for r in results["models"]]

    # 1. Plots: the comparison, then each training curve that its stage logged.
    plots: dict[str, Path] = {}
    if replies and plot_comparison(eval_dir / "comparison.png", results, replies):
        plots["comparison.png"] = eval_dir / "comparison.png"
    for file, stage, title, ylabel, wanted in TRAINING_PLOTS:
        rows = read_metrics(run / stage / "metrics.jsonl")
        lines = [(label, *series(rows, keys)) for label, keys in wanted]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            plot_training(eval_dir / file, title, ylabel, lines)
            plots[file] = eval_dir / file

    # 2. The report.
    s = results["settings"]
    md = [f"# rlhfchat report: {recipe.name}", "",
          f"Run folder `{run}`; evaluated {results['created']}. Models: "
          + ", ".join(f"**{r['model']}** (`{r['path']}`)" for r in results["models"]) + ".", "",
          f"## Comparison on {s['prompts']} held-out prompts", "",
          (f"Replies are greedy, at most {s['max_new_tokens']} new tokens, cut at the stop sequence. *reward*: the "
          "run's reward model's score of each reply; *win rate*: share of prompts where the model's reply scores "
          f"above the {results.get('baseline', 'sft')} model's (ties count half), with a paired bootstrap 95% "
          "interval; *math exact match*: the last number of the reply equals the answer, on the math prompts; *KL to "
          "reference*: KL(model ‖ the model it was trained from) per reply on replies sampled from the model. Task "
          "columns: lm-eval scores (see below)."), "",
          *_comparison_table(results), ""]
    if results.get("win_rates"):
        md += ["### Win rates", "", "| | win rate | 95% interval | wins / ties / losses | prompts |",
               "|---|---|---|---|---|"]
        for w in results["win_rates"].values():
            md.append(f"| **{w['a']}** over **{w['b']}** | {w['win_rate']:.3f} | [{w['ci95'][0]:.3f}, "
                      f"{w['ci95'][1]:.3f}] | {w['wins']} / {w['ties']} / {w['losses']} | {w['n']} |")
        md.append("")
    if "comparison.png" in plots:
        md += ["![reward scores and win rates](comparison.png)", ""]
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
        if file in plots:
            md += [f"![{title}]({file})", ""]
    final = {stage: _read_json(run / stage / "metrics.json") for stage in ("sft", "reward", "ppo", "dpo", "kto")}
    facts = [f"{stage}: " + ", ".join(f"{k} {_num(v, '.4g')}" for k, v in m.items() if isinstance(v, (int, float))
                                     and not isinstance(v, bool))
             for stage, m in final.items() if m]
    if facts:
        md += ["Final figures (each stage's metrics.json):", "", *(f"- {f}" for f in facts), ""]
    if not any(f in plots for f, *_ in TRAINING_PLOTS):
        md += ["No stage logged per-step metrics (metrics.jsonl) in this run folder.", ""]
    if replies:
        md += ["## Held-out prompts, answered side by side", "", *_examples(replies, names)]

    report = eval_dir / "report.md"
    with atomic_file(report) as f:
        f.write("\n".join(md).rstrip() + "\n")
    print(f"[report] {len(plots)} plots; report written to {report}")
    return report


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
