"""The report: markdown tables, training plots as real PNG images, answers side by side.

    pytest tests/test_report.py
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from rlhfchat.errors import RlhfchatError

MODELS = ["base", "sft", "ppo"]
PROMPTS = ["What is 12 + 7?", "Write a Python function that adds 3 to a number.",
           'Fix the grammar: "She go to school."', "Tell me a joke.", "What is 9 - 4?"]


CHANGE = [1.0, -2.0, 3.0, 0.5, -0.1]  # ppo's reward minus sft's, per prompt: sorted p2, p0, p3 | p4, p1


def _row(name: str, reward: float, kl: float | None) -> dict:
    return {"model": name, "path": f"runs/x/{name}", "n_prompts": len(PROMPTS), "reward_mean": reward,
            "reward_std": 0.5, "mean_length": 20.0, "mean_chars": 80.0, "stopped": 1.0, "math_exact_match": 0.5,
            "math_n": 2, "kl_to_ref": kl, "kl_trlx": None if kl is None else 5 * kl,
            "judge_mean": reward / 2, "judge_std": 0.25,
            "tasks": {"rlhfchat_math": {"metric": "exact_match", "filter": "last-integer", "score": 0.4,
                                        "stderr": 0.07, "n": 50, "metrics": {"exact_match,last-integer": 0.4}},
                      "hellaswag": {"error": "ConnectionError: offline"}}}


def _win(a: str, b: str, rate: float) -> dict:
    return {"a": a, "b": b, "win_rate": rate, "ci95": [rate - 0.1, rate + 0.1], "n": 64, "wins": 40, "ties": 2,
            "losses": 22}


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run folder with eval results and every stage's metrics.jsonl, as a finished pipeline leaves it."""
    run = tmp_path / "run"
    rng = random.Random(0)
    for stage in ("sft", "reward", "ppo", "eval"):
        (run / stage).mkdir(parents=True)

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(run / "sft" / "metrics.jsonl",
          [{"step": s, "epoch": s / 50, "loss": 4 * math.exp(-s / 15) + 0.6 + 0.1 * rng.random()}
           for s in range(5, 101, 5)] + [{"step": 100, "eval_loss": 0.95}, {"step": 100, "train_loss": 1.3}])
    jsonl(run / "reward" / "metrics.jsonl",
          [{"step": s, "loss": 0.7 - s / 300, "accuracy": min(0.95, 0.5 + s / 150)} for s in range(10, 101, 10)]
          + [{"step": 100, "eval_accuracy": 0.8}])
    (run / "ppo" / "metrics.json").write_text(json.dumps({
        "eval_reward_before": -0.5, "eval_reward_std_before": 1.1, "eval_reward_after": 0.7,
        "eval_reward_std_after": 0.9, "eval_prompts": len(PROMPTS), "kl": 2.4}))
    jsonl(run / "ppo" / "metrics.jsonl",  # the PPO stage's key names
          [{"step": s, "score": 1 - math.exp(-s / 20) + 0.2 * rng.gauss(0, 1), "kl": 0.04 * s, "value_loss":
            math.exp(-s / 15), "response_len": 30 + 5 * rng.random(), "policy_loss": 0.01,
            "entropy": 3 - s / 40, "clipfrac": 0.1 * rng.random(), "value_clipfrac": 0.2 * rng.random(),
            "rewards/reward_model": 0.5 + 0.01 * s, "rewards/math": min(1.0, s / 60)}
           for s in range(1, 61)])
    results = {"run": "tiny", "created": "2026-01-01T00:00:00+00:00",
               "settings": {"prompts": len(PROMPTS), "max_new_tokens": 48, "decoding": "greedy",
                            "tasks": ["rlhfchat_math", "hellaswag"], "limit": None, "bootstrap": 1000, "seed": 0,
                            "judge": "org/judge-rm", "math_prompts": 2},
               "models": [_row("base", -1.0, None), _row("sft", 0.1, None), _row("ppo", 0.9, 3.2)],
               "win_rates": {"ppo_vs_sft": _win("ppo", "sft", 0.7), "sft_vs_base": _win("sft", "base", 0.8),
                             "ppo_vs_base": _win("ppo", "base", 0.9)},
               "win_rates_by": {"judge": {"ppo_vs_sft": _win("ppo", "sft", 0.4), "sft_vs_base": _win("sft", "base", 0.6),
                                          "ppo_vs_base": _win("ppo", "base", 0.55)},
                                "math_exact_match": {"ppo_vs_sft": _win("ppo", "sft", 0.5)}}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    rewards = {"base": [0.3, 0.1, -1, 2, 0], "sft": [0.0] * 5, "ppo": CHANGE}  # ppo - sft: CHANGE
    jsonl(run / "eval" / "replies.jsonl", [
        {"id": f"p{i}", "source": "test", "prompt": [{"role": "user", "content": q}],
         "replies": {m: {"text": f"{m} says | hi\nline two", "n_tokens": 5, "reward": rewards[m][i], "judge": -i,
                         **({"correct": float(m == "ppo")} if i in (0, 4) else {})} for m in MODELS}}
        for i, q in enumerate(PROMPTS)])
    return run


def _recipe(run: Path):
    from rlhfchat.config import load_recipe

    return load_recipe(None, [f"output_dir={run}", "name=tiny"])


def _assert_real_image(path: Path) -> None:
    """A PNG that opens, is big enough to read, and is not blank: many colours and a fair share of ink."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    ink = (pixels.sum(axis=1) < 600).mean()  # share of pixels clearly darker than white
    assert colours > 20 and ink > 0.01, f"{path.name}: {colours} colours, {ink:.3%} ink"


def test_report_has_tables_plots_and_examples(tiny_run, capsys):
    from rlhfchat.eval import report

    path = report.main(_recipe(tiny_run))
    assert path == tiny_run / "eval" / "report.md"
    assert f"report written to {path}" in capsys.readouterr().out
    text = path.read_text()

    pngs = ["comparison.png", "sft_loss.png", "reward_accuracy.png", "ppo_score.png", "ppo_kl.png", "ppo_entropy.png",
            "ppo_clipfrac.png", "ppo_value_loss.png", "ppo_response_length.png", "ppo_rewards.png",
            "ppo_reward_vs_kl.png"]
    for name in pngs:
        assert f"]({name})" in text
        _assert_real_image(tiny_run / "eval" / name)
    # One row per model in the comparison; ppo's win rate over sft with its interval; the failed task shown.
    for m in MODELS:
        assert f"| **{m}** |" in text
    assert ("| **ppo** | 0.900 ± 0.500 | 0.700 [0.60, 0.80] | 0.450 ± 0.250 | 0.400 [0.30, 0.50] | 20.0 | 0.500 (n=2) "
            "| 3.200 | 16.000 |") in text
    assert "| **base** | -1.000 ± 0.500 | 0.200 [0.10, 0.30] | -0.500 ± 0.250 | 0.400 [0.30, 0.50] |" in text  # flipped
    assert "ConnectionError: offline" in text and "exact_match (last-integer)" in text
    # Each KL names its estimator, in the table and on the plot that PPO's log makes (and eval's, marked on it)
    assert "KL to reference: k1 = Σ log-ratio (unbiased) | KL to reference: trlX's Σ (e^r − 1 − r) (≥ 0, not a KL estimate) |" in text
    assert "![PPO: KL to the reference (SFT), trlX's estimator as PPO logs it](ppo_kl.png)" in text
    # Win rates say who judged them: the run's own reward model, eval.judge and exact answers side by side
    assert ("| | by the run's reward model | by eval.judge (`org/judge-rm`) | by exact answers (2 math prompts) |"
            in text)
    assert ("| **ppo** over **sft** | 0.700 [0.600, 0.800]; 40 / 2 / 22 of 64 | 0.400 [0.300, 0.500]; 40 / 2 / 22 of "
            "64 | 0.500 [0.400, 0.600]; 40 / 2 / 22 of 64 |") in text
    assert "| **sft** over **base** | 0.800 [0.700, 0.900]; 40 / 2 / 22 of 64 | 0.600 [0.500, 0.700]; 40 / 2 / 22 of " \
           "64 | – |" in text
    assert "the one PPO was trained to please" in text
    # The PPO stage's own figures beside eval's, and what differs
    assert "| PPO model's reward | 0.700 ± 0.900 | 0.900 ± 0.500 |" in text
    assert "| SFT model's reward (before PPO) | -0.500 ± 1.100 | 0.100 ± 0.500 |" in text
    assert "sampled, one per prompt (temperature 1, top_k 0, top_p 1: as in the rollouts)" in text
    assert "because of how the replies are drawn (sampled there, greedy here)" in text
    assert "on the last iteration's training rollouts: 2.400 | the same estimator on replies sampled for the held-out " \
           "prompts: 16.000; k1 = Σ log-ratio (unbiased): 3.200 |" in text
    # Examples: the largest rises, then the largest falls, of ppo's reward over sft's; all in samples.md
    heads = [line for line in text.splitlines() if line.startswith("### ") and line[4].isdigit()]
    assert heads == ["### 1. ▲ Fix the grammar: \"She go to school.\"", "### 2. ▲ What is 12 + 7?",
                     "### 3. ▲ Tell me a joke.", "### 4. ▼ Write a Python function that adds 3 to a number.",
                     "### 5. ▼ What is 9 - 4?"]
    assert "Reward of ppo minus sft: **+3.000** (by the run's reward model)." in text
    assert "ppo says \\| hi<br>line two" in text and "| math answer | wrong | wrong | right |" in text
    assert "[samples.md](samples.md)" in text
    samples = (tiny_run / "eval" / "samples.md").read_text()
    heads = [line for line in samples.splitlines() if line.startswith("### ")]
    assert [h.split(". ", 1)[1][:12] for h in heads] == ["Fix the gram", "What is 12 +", "Tell me a jo", "What is 9 - ",
                                                          "Write a Pyth"]
    assert samples.count("| score by eval.judge |") == 5


def test_without_a_judge_the_report_says_how_to_get_one(tiny_run):
    from rlhfchat.eval import report

    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    del results["win_rates_by"]
    results["settings"]["judge"] = None
    (tiny_run / "eval" / "results.json").write_text(json.dumps(results))
    text = report.main(_recipe(tiny_run)).read_text()
    assert "No independent judge was given: set `eval.judge`" in text
    assert "| | by the run's reward model |\n" in text and "eval.judge (`" not in text


def test_step_ticks_are_integers(tmp_path, monkeypatch):
    from rlhfchat.eval import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, out: figures.append(fig))
    plots.plot_training(tmp_path / "x.png", "t", "y", [("a", [1.0, 2.0, 3.0], [0.1, 0.3, 0.2])])
    plots.plot_reward_vs_kl(tmp_path / "y.png", [1.0, 2.0, 3.0], [0.1, 0.2, 0.4], [1.0, 1.5, 1.2], "KL")
    ticks = figures[0].axes[0].get_xticks()
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
    bar_ticks = figures[1].axes[1].get_yticks()  # the colour bar's steps
    assert all(float(t).is_integer() for t in bar_ticks)


def test_report_without_training_logs_or_ppo(tiny_run):
    from rlhfchat.eval import report

    for stage in ("sft", "reward", "ppo"):
        (tiny_run / stage / "metrics.jsonl").unlink()
    text = report.main(_recipe(tiny_run)).read_text()
    assert "sft_loss.png" not in text and "No stage logged per-step metrics" in text
    assert "comparison.png" in text


def test_series_picks_the_first_logged_key():
    from rlhfchat.eval.report import series

    rows = [{"step": 1, "response_len": 3.0}, {"step": 2, "response_len": 5.0}, {"step": 2, "other": 1}]
    assert series(rows, ["response_length", "response_len"]) == ([1.0, 2.0], [3.0, 5.0])
    assert series(rows, ["missing"]) == ([], [])


def test_report_needs_eval_results(tmp_path):
    from rlhfchat.eval import report

    with pytest.raises(RlhfchatError, match="rlhfchat eval"):
        report.main(_recipe(tmp_path / "nothing"))
