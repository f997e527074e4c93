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


def _row(name: str, reward: float, kl: float | None) -> dict:
    return {"model": name, "path": f"runs/x/{name}", "n_prompts": len(PROMPTS), "reward_mean": reward,
            "reward_std": 0.5, "mean_length": 20.0, "mean_chars": 80.0, "stopped": 1.0, "math_exact_match": 0.5,
            "math_n": 2, "kl_to_ref": kl,
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
    (run / "ppo" / "metrics.json").write_text(json.dumps({"eval_reward_before": -0.5, "eval_reward_after": 0.7}))
    jsonl(run / "ppo" / "metrics.jsonl",  # the PPO stage's key names
          [{"step": s, "score": 1 - math.exp(-s / 20) + 0.2 * rng.gauss(0, 1), "kl": 0.04 * s, "value_loss":
            math.exp(-s / 15), "response_len": 30 + 5 * rng.random(), "policy_loss": 0.01} for s in range(1, 61)])
    results = {"run": "tiny", "created": "2026-01-01T00:00:00+00:00",
               "settings": {"prompts": len(PROMPTS), "max_new_tokens": 48, "decoding": "greedy",
                            "tasks": ["rlhfchat_math", "hellaswag"], "limit": None, "bootstrap": 1000, "seed": 0},
               "models": [_row("base", -1.0, None), _row("sft", 0.1, None), _row("ppo", 0.9, 3.2)],
               "win_rates": {"ppo_vs_sft": _win("ppo", "sft", 0.7), "sft_vs_base": _win("sft", "base", 0.8),
                             "ppo_vs_base": _win("ppo", "base", 0.9)}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    jsonl(run / "eval" / "replies.jsonl", [
        {"id": f"p{i}", "source": "test", "prompt": [{"role": "user", "content": q}],
         "replies": {m: {"text": f"{m} says | hi\nline two", "n_tokens": 5, "reward": rng.gauss(k, 1)}
                     for k, m in enumerate(MODELS)}}
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

    pngs = ["comparison.png", "sft_loss.png", "reward_accuracy.png", "ppo_score.png", "ppo_kl.png",
            "ppo_value_loss.png", "ppo_response_length.png"]
    for name in pngs:
        assert f"]({name})" in text
        _assert_real_image(tiny_run / "eval" / name)
    # One row per model in the comparison; ppo's win rate over sft with its interval; the failed task shown.
    for m in MODELS:
        assert f"| **{m}** |" in text
    assert "| **ppo** | 0.900 ± 0.500 | 0.700 [0.60, 0.80] |" in text
    assert "| **base** | -1.000 ± 0.500 | 0.200 [0.10, 0.30] |" in text  # stored as sft over base: flipped
    assert "| **ppo** over **sft** | 0.700 | [0.600, 0.800] | 40 / 2 / 22 | 64 |" in text
    assert "ConnectionError: offline" in text and "exact_match (last-integer)" in text
    # Examples: one per skill first, then the next prompt; replies escaped for a table cell.
    assert "### 1. What is 12 + 7?" in text and "### 3. Fix the grammar" in text and "### 4. Tell me a joke." in text
    assert text.count("| reply |") == 4
    assert "ppo says \\| hi<br>line two" in text


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
