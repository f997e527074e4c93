"""Held-out math: the `rlhfchat_math` problems, and the demo run's held-out math prompts, occur in no training data.

    pytest tests/test_held_out.py

A problem is its key (`samples.problem_key`): "12 + 7", "7 plus 12" and "What is 12 + 7?" are one problem. The
check reads what training reads: the data stage's train files for the demo recipe, every message and reply.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhfchat.data.samples import (all_problems, expected_math_answer, held_out_problems, math_problems, problem_key,
                                   solve, worked)

ROOT = Path(__file__).resolve().parents[1]


def test_a_problem_is_one_key_however_it_is_written():
    assert problem_key(12, "plus", 7) == problem_key(7, "+", 12) == (7, "+", 12)
    assert problem_key(3, "times", 4) == problem_key(4, "x", 3) == problem_key(4, "*", 3) == (3, "*", 4)
    assert problem_key(12, "minus", 7) == (12, "-", 7) != problem_key(7, "-", 12)
    assert math_problems("Thanks! How much is 17 minus 4?") == {(17, "-", 4)}
    # every pair of a worked solution, overlapping ones too
    assert math_problems("17 + 8 = 10 + 7 + 8 = 10 + 15 = 25") == {(8, "+", 17), (7, "+", 10), (7, "+", 8),
                                                                   (10, "+", 15)}
    # a word problem states no "A op B": its numbers and its answer say which problem it is
    assert math_problems("Tom has 12 apples and buys 7 more. How many?", "19") == {(7, "+", 12)}
    assert math_problems("2 bags of 2 pens", 4) == {(2, "+", 2), (2, "*", 2)}
    assert math_problems("Write a Python function that adds 3 to a number.") == set()
    assert math_problems("def add_3(x): return x + 3") == set()


def _value(expression: str) -> int:
    assert re.fullmatch(r"[\d +*-]+", expression), expression
    return eval(expression)  # digits, spaces, + - * only


def test_worked_solutions_are_right_step_by_step():
    for op, keys in all_problems().items():
        for a, _, b in keys:
            for x, y in {(a, b), (b, a)} if op in "+*" else {(a, b)}:
                steps = worked(x, op, y).split(" = ")
                assert steps[0] == f"{x} {op} {y}" and int(steps[-1]) == solve(x, op, y)
                assert {_value(s) for s in steps} == {solve(x, op, y)}, steps
    assert worked(17, "+", 14) == "17 + 14 = 10 + 10 + 7 + 4 = 20 + 11 = 31"
    assert worked(13, "-", 7) == "13 - 7 = 10 - 7 + 3 = 3 + 3 = 6"
    assert worked(20, "-", 7) == "20 - 7 = 10 + 10 - 7 = 10 + 3 = 13"
    assert worked(7, "*", 8) == "7 * 8 = 56"  # a fact: products are learnt, not composed


def test_the_held_out_pool_is_never_a_step_of_another_solution():
    held = held_out_problems()
    assert {op: sum(k[1] == op for k in held) for op in "+-*"} == {"+": 38, "-": 43, "*": 0}
    for op, keys in all_problems().items():
        for a, _, b in keys:
            assert not (math_problems(worked(a, op, b)) - {(a, op, b)}) & held, (a, op, b)
    # composite problems only: no one-digit fact (nor a product) is held out
    assert all(max(a, b) > 10 and worked(a, op, b).count(" = ") > 1 for a, op, b in held)


def test_the_eval_task_is_the_held_out_pool():
    from rlhfchat.eval.tasks import TASKS_DIR, build

    items = build.math_items()
    on_disk = [json.loads(line) for line in (TASKS_DIR / "data" / "math.jsonl").read_text().splitlines()]
    assert on_disk == items, "data/math.jsonl is stale: python -m rlhfchat.eval.tasks.build"
    keys = [math_problems(it["question"]) for it in items]
    assert all(len(k) == 1 for k in keys)
    assert {k for (k,) in keys} == held_out_problems()  # each held-out problem once
    assert all(str(expected_math_answer(it["question"])) == it["answer"] for it in items)


def _problems(kind: str, rec: dict) -> set:
    """Every problem a canonical record states, in any message or reply (and a prompt's, through its reference)."""
    if kind == "sft":
        texts = [m["content"] for m in rec["messages"]]
    elif kind == "preferences":
        texts = [m["content"] for m in rec["prompt"]] + [rec["chosen"], rec["rejected"]]
    else:
        texts = [m["content"] for m in rec["prompt"]]
    found = set().union(*(math_problems(t) for t in texts))
    if kind == "prompts" and "reference" in rec:
        found |= math_problems(rec["prompt"][-1]["content"], rec["reference"])
    return found


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The data stage of the demo recipe (recipes/tiny-cpu.yaml) on the bundled sample data."""
    from rlhfchat.config import load_recipe
    from rlhfchat.data import mixture

    out = tmp_path_factory.mktemp("demo")
    mixture.build(load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"output_dir={out}"]))
    return out / "data"


def _records(data: Path, kind: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"{kind}.{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["sft", "preferences", "prompts"])
def test_no_training_record_states_an_eval_problem(demo_data, kind):
    held = held_out_problems()
    records = _records(demo_data, kind, "train")
    stated = [_problems(kind, r) for r in records]
    assert sum(bool(p) for p in stated) > 300  # the check sees the math that is there
    leaks = [(r["id"], sorted(p & held)) for r, p in zip(records, stated) if p & held]
    assert not leaks, f"{len(leaks)} {kind} training records state held-out problems, e.g. {leaks[:3]}"


def test_the_held_out_prompts_are_held_out_math(demo_data):
    """The data stage's held-out prompts (the test and validation splits) ask held-out problems only."""
    prompts = _records(demo_data, "prompts", "eval")
    asked = [math_problems(r["prompt"][-1]["content"], r.get("reference")) for r in prompts]
    assert sum(bool(p) for p in asked) > 80 and all(p <= held_out_problems() for p in asked)
    assert sum("reference" in r for r in prompts) >= 90  # the gsm8k test split, with its references
