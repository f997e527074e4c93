"""The report's PNG plots (matplotlib's Agg backend: no display needed). Every step axis has integer ticks.

    comparison.png            reward scores per model (box) and win rates with 95% intervals, by each judge
    <stage>_<metric>.png      one logged metric over steps (report.TRAINING_PLOTS), with optional marks
    ppo_rewards.png           each of ppo.rewards' components over steps (rewards/<name> in PPO's log)
    ppo_reward_vs_kl.png      PPO's mean rollout score against its KL, one point per iteration, coloured by step
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

JUDGE_LABELS = {"reward_model": "the run's reward model", "judge": "eval.judge", "math_exact_match": "exact answers"}
"""How plots and tables name who judged a win rate."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _integer_steps(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(plt: Any, fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(out: Path, title: str, ylabel: str, lines: list[tuple[str, list[float], list[float]]],
                  marks: list[tuple[str, float, float]] = ()) -> None:
    """One metric over steps: each series as points (few) or a faint raw line plus its moving average (many).

    `marks`: (label, step, value) points drawn large beside the lines, e.g. the same quantity measured elsewhere.
    """
    plt, fig, ax = _figure(title)
    for k, (label, xs, ys) in enumerate(lines):
        color = f"C{k}"
        if len(xs) == 1:  # a single figure (e.g. the held-out value at the end)
            ax.scatter(xs, ys, color=color, s=60, marker="D", zorder=3, label=f"{label}: {ys[0]:.3g}")
        elif len(xs) > 40:
            window = max(3, len(xs) // 20)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
            ax.plot(xs, moving_average(ys, window), color=color, linewidth=2,
                    label=f"{label} (moving average of {window})")
        else:
            ax.plot(xs, ys, color=color, marker="o", markersize=4, linewidth=1.8, label=label)
    for k, (label, x, y) in enumerate(marks, start=len(lines)):
        ax.scatter([x], [y], color=f"C{k}", s=70, marker="*D^s"[k % 4], zorder=4, label=f"{label}: {y:.3g}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    _integer_steps(ax)
    ax.legend(fontsize=8, loc="best")
    _save(plt, fig, out)


def plot_reward_vs_kl(out: Path, steps: list[float], kls: list[float], scores: list[float], kl_label: str) -> None:
    """PPO's mean rollout score against its KL to the reference, one point per iteration, coloured by step: how much
    reward each nat of drift bought."""
    plt, fig, ax = _figure("PPO: reward-model score against KL, per iteration")
    points = ax.scatter(kls, scores, c=steps, cmap="viridis", s=28, zorder=3)
    ax.plot(kls, scores, color="grey", alpha=0.3, linewidth=1, zorder=2)
    bar = fig.colorbar(points, ax=ax)
    bar.set_label("step")
    from matplotlib.ticker import MaxNLocator

    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax.set_xlabel(kl_label)
    ax.set_ylabel("mean score of the rollouts")
    _save(plt, fig, out)


def plot_comparison(out: Path, results: dict[str, Any], replies: list[dict[str, Any]]) -> bool:
    """Reward-score distribution per model and the win rates with 95% intervals, grouped by judge (the run's reward
    model, eval.judge, exact answers); False when there are no rewards."""
    names = [r["model"] for r in results["models"]]
    scores = [[rec["replies"][n]["reward"] for rec in replies if rec["replies"].get(n, {}).get("reward") is not None]
              for n in names]
    if not any(scores):
        return False
    plt = _pyplot()
    by = {"reward_model": results.get("win_rates", {}), **results.get("win_rates_by", {})}
    by = {k: v for k, v in by.items() if v}
    pairs = list(by.get("reward_model", {}))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.3]})
    left.boxplot(scores, tick_labels=names, showmeans=True)
    left.set_title("Scores by the run's reward model\n(the one PPO was trained against)", fontsize=10)
    left.set_ylabel("score")
    left.grid(True, axis="y", alpha=0.3)
    height = 0.8 / max(len(by), 1)
    ys = list(range(len(pairs)))[::-1]
    for j, (judge, rates) in enumerate(by.items()):
        offset = (len(by) - 1) / 2 * height - j * height
        label = JUDGE_LABELS.get(judge, judge)
        for y, pair in zip(ys, pairs):
            w = rates.get(pair)
            if w is None:
                continue
            right.barh(y + offset, w["win_rate"], height=height * 0.9, color=f"C{j}", alpha=0.8,
                       xerr=[[w["win_rate"] - w["ci95"][0]], [w["ci95"][1] - w["win_rate"]]], capsize=4,
                       label=f"{label} (n={w['n']})" if label else None)
            label = None  # one legend entry per judge
            right.text(0.01, y + offset, f"{w['win_rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]", fontsize=8,
                       va="center")
    right.axvline(0.5, color="black", linestyle="--", linewidth=1)
    right.set_yticks(ys, [f"{by['reward_model'][p]['a']} over {by['reward_model'][p]['b']}" for p in pairs])
    right.set_ylim(-0.7, max(len(ys), 1) - 0.3)
    right.set_xlim(0, 1)
    right.set_xlabel("win rate (ties count half), 95% bootstrap interval")
    right.set_title("Win rates, by judge", fontsize=10)
    handles, labels = right.get_legend_handles_labels()
    if handles:
        right.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="judged by",
                     title_fontsize=8)  # beside the bars, never over them
    _save(plt, fig, out)
    return True
