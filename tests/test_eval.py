"""The eval stage: win-rate bootstrap, generation/log-prob invariants, the local lm-eval tasks, and a tiny run.

    pytest tests/test_eval.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlhfchat.errors import RlhfchatError
from rlhfchat.eval.winrate import bootstrap_ci, outcomes, win_rate

# ----------------------------------------------------------------------------------------------------------------
# Win rate: pure, hand-computed


def test_win_rate_counts_ties_as_half():
    # prompt by prompt: win (3 > 1), tie (2 = 2), loss (1 < 4), win (5 > 0)
    assert outcomes([3, 2, 1, 5], [1, 2, 4, 0]).tolist() == [1.0, 0.5, 0.0, 1.0]
    w = win_rate([3, 2, 1, 5], [1, 2, 4, 0], iters=100)
    assert w["win_rate"] == pytest.approx(2.5 / 4)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)


def test_bootstrap_known_intervals():
    # Every resample of all-wins (or all-ties) has the same mean: the interval collapses onto it.
    assert win_rate([1, 1, 1], [0, 0, 0])["ci95"] == [1.0, 1.0]
    assert win_rate([2, 2], [2, 2])["ci95"] == [0.5, 0.5]
    # One win and one loss: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the 2.5th and 97.5th
    # percentiles are 0 and 1.
    assert win_rate([1, 0], [0, 1], iters=4000)["ci95"] == [0.0, 1.0]
    # 60 wins in 100: the bootstrap mean has sd sqrt(0.6 * 0.4 / 100) = 0.049, so about 0.6 -+ 1.96 * 0.049.
    lo, hi = bootstrap_ci(np.array([1.0] * 60 + [0.0] * 40), iters=4000, seed=0)
    assert lo == pytest.approx(0.504, abs=0.015) and hi == pytest.approx(0.696, abs=0.015)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(123)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert win_rate(a, b, seed=7) == win_rate(a, b, seed=7)
    assert bootstrap_ci(a, seed=7) == bootstrap_ci(a, seed=7) != bootstrap_ci(a, seed=8)
    with pytest.raises(ValueError):
        outcomes([1, 2], [1])


# ----------------------------------------------------------------------------------------------------------------
# Generation, scoring and log-probs on the tiny fixtures

PROMPTS = [[{"role": "user", "content": q}] for q in
           ["What is 3 + 4?", "Write a Python function that adds 3 to a number.", 'Fix the grammar: "She go home."',
            "What is 10 - 7?", "Calculate 2 times 5."]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rlhfchat.eval.generate import load_causal_lm

    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir):
    """The tiny model with its weights nudged: a stand-in for a PPO model that moved away from its reference."""
    import torch

    from rlhfchat.eval.generate import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_generate_is_deterministic_and_bounded(tiny):
    from rlhfchat.eval.generate import replies_to as generate_replies

    model, tok = tiny
    greedy = [generate_replies(model, tok, PROMPTS, max_new_tokens=6, batch_size=2) for _ in range(2)]
    assert [r.text for r in greedy[0]] == [r.text for r in greedy[1]]
    sampled = [generate_replies(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=3) for _ in range(2)]
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]
    for r in greedy[0]:
        assert 0 < len(r.token_ids) <= 6 and r.n_tokens <= len(r.token_ids)
        assert r.prompt_ids[-len(tok("### Assistant:")["input_ids"]):] == tok("### Assistant:")["input_ids"]
    # Left padding must not change a greedy reply: each prompt alone gives the same tokens as in the batch.
    alone = [generate_replies(model, tok, [p], max_new_tokens=6)[0].token_ids for p in PROMPTS]
    assert alone == [r.token_ids for r in greedy[0]]


def test_the_cut_keeps_the_reply_before_its_stop(tiny):
    from rlhfchat.decoding import _kept_tokens, cut_at_stop

    _, tok = tiny
    reply = tok(" 3 + 4 = 7.", add_special_tokens=False)["input_ids"]
    stop = tok("\n### Human: next", add_special_tokens=False)["input_ids"]
    text, hit = cut_at_stop(tok.decode(reply + stop), ["### Human:"])
    assert hit and _kept_tokens(reply + stop, tok, text) == len(reply)


def test_sequence_logprobs_match_by_hand_and_ignore_padding(tiny):
    import torch

    from rlhfchat.eval.generate import sequence_logprobs

    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ["### Human: What is 1 + 1?\n### Assistant:",
                                             "### Human: Hi\n### Assistant:"]]
    replies = [tok(t)["input_ids"] for t in [" 1 + 1 = 2.</s>", " Hello there, how are you today?</s>"]]
    batched = sequence_logprobs(model, prompts, replies, pad_id=tok.pad_token_id, batch_size=2)
    alone = [sequence_logprobs(model, [p], [r], pad_id=tok.pad_token_id)[0] for p, r in zip(prompts, replies)]
    assert batched == pytest.approx(alone, abs=1e-4)
    # By hand for the first pair: log p(reply token t | everything before it), summed.
    ids = torch.tensor([prompts[0] + replies[0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompts[0])
    expected = sum(logp[n + i - 1, tok_id].item() for i, tok_id in enumerate(replies[0]))
    assert batched[0] == pytest.approx(expected, abs=1e-4)


def test_kl_to_reference_is_zero_for_itself_and_positive_otherwise(tiny, perturbed):
    from rlhfchat.eval.generate import kl_to_reference

    model, tok = tiny
    same = kl_to_reference(model, model, tok, PROMPTS, max_new_tokens=6, seed=0)
    assert same["kl"] == 0.0 and same["n"] == len(PROMPTS) and same["tokens"] > 0
    moved = kl_to_reference(perturbed, model, tok, PROMPTS * 4, max_new_tokens=6, seed=0)
    assert moved["kl"] > 0


def test_reward_scores_are_batch_invariant(tiny_reward_dir):
    from rlhfchat.train.reward import RewardScorer

    scorer = RewardScorer(tiny_reward_dir, batch_size=5)
    replies = ["3 + 4 = 7. The answer is 7.", "def add_3(x): return x + 3", "She goes home.", "3.", "10."]
    batched = scorer.score(PROMPTS, replies).tolist()
    alone = [scorer.score([p], [r]).item() for p, r in zip(PROMPTS, replies)]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len({round(s, 6) for s in batched}) > 1


# ----------------------------------------------------------------------------------------------------------------
# Local lm-eval tasks


def test_local_tasks_give_expected_keys_and_sample_counts(tiny):
    from lm_eval.tasks import TaskManager

    from rlhfchat.eval.benchmarks import run_tasks
    from rlhfchat.eval.tasks import TASKS_DIR

    model, tok = tiny
    # hellaswag from lm-eval's own folder (indexing all of lm-eval's tasks takes seconds): offline it records an error
    # and the local tasks still run.
    import lm_eval

    manager = TaskManager(include_path=[str(TASKS_DIR), str(Path(lm_eval.__file__).parent / "tasks" / "hellaswag")],
                          include_defaults=False)
    results = run_tasks(model, ["rlhfchat", "hellaswag"], tokenizer=tok, limit=3, bootstrap=100, manager=manager)
    assert list(results) == ["rlhfchat_math", "rlhfchat_code", "rlhfchat_grammar", "hellaswag"]
    math = results["rlhfchat_math"]
    assert (math["metric"], math["filter"], math["n"]) == ("exact_match", "last-integer", 3)
    assert 0.0 <= math["score"] <= 1.0 and set(math["metrics"]) == {"exact_match,last-integer"}
    for name in ("rlhfchat_code", "rlhfchat_grammar"):
        r = results[name]
        assert r["n"] == 3 and r["metric"] == "acc_norm" and set(r["metrics"]) == {"acc", "acc_norm"}
        assert 0.0 <= r["score"] <= 1.0 and r["stderr"] is not None
    assert "error" in results["hellaswag"] or results["hellaswag"]["n"] == 3


def test_summary_of_standard_task_output():
    """lm-eval's output for a group (MMLU: nested groups) and for a task with two filters (GSM8K), by hand."""
    from rlhfchat.eval.benchmarks import _summarize

    out = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
                       "mmlu_a": {"alias": " - a", "acc,none": 0.2, "acc_stderr,none": 0.1}},
           "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_a", "mmlu_b"]},
           "n-samples": {"mmlu_a": {"original": 100, "effective": 10}, "mmlu_b": {"original": 50, "effective": 5}}}
    s = _summarize("mmlu", out)
    assert (s["metric"], s["filter"], s["score"], s["stderr"], s["n"]) == ("acc", None, 0.3, 0.01, 15)
    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.1,
                                 "exact_match_stderr,strict-match": 0.02, "exact_match,flexible-extract": 0.15,
                                 "exact_match_stderr,flexible-extract": "N/A"}},
           "group_subtasks": {}, "n-samples": {"gsm8k": {"original": 1319, "effective": 1319}}}
    s = _summarize("gsm8k", out)
    assert (s["metric"], s["filter"], s["score"], s["stderr"], s["n"]) == ("exact_match", "strict-match", 0.1, 0.02,
                                                                           1319)
    assert s["metrics"] == {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.15}


def test_unknown_task_is_a_clear_error():
    from lm_eval.tasks import TaskManager

    from rlhfchat.eval.benchmarks import check_tasks
    from rlhfchat.eval.tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    check_tasks(["rlhfchat_math", "rlhfchat"], manager)
    with pytest.raises(RlhfchatError, match="rlhfchat_maths.*did you mean rlhfchat_math"):
        check_tasks(["rlhfchat_maths"], manager)


def test_task_items_are_the_sample_families():
    """(The math task's items, the held-out problems, are checked in tests/test_held_out.py.)"""
    from rlhfchat.eval.tasks import TASKS_DIR, build

    for skill, items in (("code", build.choice_items("code", 50)), ("grammar", build.choice_items("grammar", 50))):
        on_disk = [json.loads(line) for line in (TASKS_DIR / "data" / f"{skill}.jsonl").read_text().splitlines()]
        assert on_disk == items, f"data/{skill}.jsonl is stale: python -m rlhfchat.eval.tasks.build"
        assert len({it["question"] for it in items}) == 50


# ----------------------------------------------------------------------------------------------------------------
# The stage on a tiny run: base, sft, ppo, reward


def make_run(root: Path, tiny_model_dir: Path, tiny_reward_dir: Path, perturbed) -> Path:
    """A run folder as the pipeline leaves it before eval (models without training, prompts of the three skills)."""
    run = root / "run"
    (run / "data").mkdir(parents=True)
    with open(run / "data" / "prompts.eval.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS * 2):
            f.write(json.dumps({"id": f"p{i}", "source": "test", "prompt": p}) + "\n")
    shutil.copytree(tiny_model_dir, run / "base")
    shutil.copytree(tiny_model_dir, run / "sft")
    shutil.copytree(tiny_reward_dir, run / "reward")
    shutil.copytree(tiny_model_dir, run / "ppo")
    perturbed.save_pretrained(run / "ppo")
    return run


def _independent_judge(reward_dir: Path, out: Path) -> Path:
    """A reward model that disagrees with the run's: its score head negated."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    with torch.no_grad():
        model.score.weight.neg_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(reward_dir).save_pretrained(out)
    return out


def test_eval_stage_writes_results_and_skips_when_done(tmp_path, tiny_model_dir, tiny_reward_dir, perturbed, capsys):
    from rlhfchat.config import load_recipe
    from rlhfchat.eval import report
    from rlhfchat.eval import run as eval_run

    run = make_run(tmp_path, tiny_model_dir, tiny_reward_dir, perturbed)
    judge = _independent_judge(tiny_reward_dir, tmp_path / "judge")
    recipe = load_recipe(None, [f"output_dir={run}", "eval.prompts=8", "eval.max_new_tokens=6",
                                "eval.tasks=[rlhfchat_math]", "eval.limit=2", "eval.bootstrap=200",
                                f"eval.judge={judge}", 'ppo.rewards=[{kind: reward_model}, {kind: math},'
                                ' {kind: function, function: "tests._toy_rewards:chars"}]'])
    results = eval_run.main(recipe)

    on_disk = json.loads((run / "eval" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert [r["model"] for r in on_disk["models"]] == ["base", "sft", "ppo"]
    for row in on_disk["models"]:
        assert set(row) >= {"model", "path", "n_prompts", "reward_mean", "reward_std", "mean_length",
                            "math_exact_match", "math_n", "kl_to_ref", "tasks"}
        assert row["n_prompts"] == 8 and row["math_n"] == 4  # PROMPTS twice, first 8: 4 math questions
        assert 0 < row["mean_length"] <= 6 and row["tasks"]["rlhfchat_math"]["n"] == 2
    kl = {r["model"]: r["kl_to_ref"] for r in on_disk["models"]}
    assert kl["base"] is None and kl["sft"] is None and kl["ppo"] > 0
    ppo = on_disk["models"][2]
    assert ppo["kl_estimator"] == "k1" and ppo["kl_k3"] > 0 and ppo["kl_trlx"] > 0
    # the second judges: an independent reward model (its own scores), and exact answers on the 4 math prompts
    assert on_disk["settings"]["judge"] == str(judge) and on_disk["settings"]["math_prompts"] == 4
    assert set(on_disk["win_rates_by"]) == {"judge", "math_exact_match"}
    assert set(on_disk["win_rates_by"]["judge"]) == set(on_disk["win_rates"])
    assert on_disk["win_rates_by"]["math_exact_match"]["ppo_vs_sft"]["n"] == 4
    assert all(r["judge_mean"] != r["reward_mean"] for r in on_disk["models"])
    assert next(iter(on_disk["win_rates"])) == "ppo_vs_sft"
    assert set(on_disk["win_rates"]) == {"ppo_vs_sft", "sft_vs_base", "ppo_vs_base"}
    w = on_disk["win_rates"]["ppo_vs_sft"]
    assert w["n"] == 8 and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
    replies = (run / "eval" / "replies.jsonl").read_text().splitlines()
    assert len(replies) == 8 and set(json.loads(replies[0])["replies"]) == {"base", "sft", "ppo"}
    first = json.loads(replies[0])["replies"]["ppo"]
    assert set(first) == {"text", "n_tokens", "reward", "judge", "correct", "rewards"}  # prompt 0 asks math
    # each reply's value of every check: the function's is the reply's length in characters
    for line in replies:
        for reply in json.loads(line)["replies"].values():
            assert reply["rewards"] == {"math": 0.0, "chars": float(len(reply["text"]))}
    # ppo.rewards' components, each model's mean over the held-out prompts: the reward model's is reward_mean, the
    # function's the mean length of its replies in characters, math 0 (these records carry no reference)
    assert on_disk["settings"]["checks"] == ["math", "chars"]
    for row in on_disk["models"]:
        assert row["rewards"] == pytest.approx({"reward_model": row["reward_mean"], "math": 0.0,
                                                "chars": row["mean_chars"]})
        assert row["mean_chars"] > 0
    assert json.loads((run / "eval" / "manifest.json").read_text())["status"] == "complete"
    out = capsys.readouterr().out
    assert "win rate ppo over sft by the run's reward model" in out and "KL k1" in out and "KL trlX" in out
    assert "win rate ppo over sft by judge" in out and "win rate ppo over sft by math exact match" in out
    header = next(line for line in out.splitlines() if line.startswith("model "))
    assert header.split()[-3:] == ["math", "chars", "rlhfchat_math"]  # the checks' columns, then the tasks'

    # Done: a rerun skips, and still prints the comparison.
    assert eval_run.main(recipe) == on_disk
    out = capsys.readouterr().out
    assert "skipping" in out and "win rate ppo over sft" in out

    # The report builds from this run (no training logs here: the comparison plot only).
    path = report.main(recipe)
    text = path.read_text()
    assert "| **ppo** |" in text and "![reward scores and win rates by judge](comparison.png)" in text
    assert (run / "eval" / "comparison.png").stat().st_size > 10_000
    assert str(path) in capsys.readouterr().out


def test_eval_without_models_is_a_clear_error(tmp_path):
    from rlhfchat.config import load_recipe
    from rlhfchat.eval import run as eval_run

    with pytest.raises(RlhfchatError, match="no finished model"):
        eval_run.main(load_recipe(None, [f"output_dir={tmp_path / 'empty'}"]))
