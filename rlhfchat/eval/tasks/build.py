"""Write the items of the local lm-eval tasks from the sample data's problem families (deterministic).

    python -m rlhfchat.eval.tasks.build [--n 50] [--out rlhfchat/eval/tasks/data]

Questions and replies come from `rlhfchat.data.samples` (the same phrasings and the same kinds of wrong reply the
preference data holds), drawn from their own random stream, so the files change only when the sample families do.
The math task holds every problem of `samples.held_out_problems()` once: problems that no train split of the sample
data holds (tests/test_eval.py checks the run's training files too).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from rlhfchat.atomic import atomic_file
from rlhfchat.eval.tasks import TASKS_DIR

# Which replies compete in the multiple-choice tasks: the correct one first, then the two kinds of wrong.
CHOICE_KINDS = ("good", "wrong_hard", "wrong_easy")


def math_items(seed: int = 0) -> list[dict[str, Any]]:
    """One item per held-out problem (`samples.held_out_problems()`: no train split of the sample data holds one, in
    any phrasing or operand order), in a shuffled order, each in one of the sample data's phrasings."""
    from rlhfchat.data import samples

    rng = random.Random(f"rlhfchat-eval:{seed}:math")
    problems = sorted(samples.held_out_problems())
    rng.shuffle(problems)
    items = []
    for a, op, b in problems:
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a
        c = a + b if op == "+" else a - b if op == "-" else a * b
        question = samples.ask(samples.Task("math", {"a": a, "op": op, "b": b, "c": c}), rng)
        assert samples.expected_math_answer(question) == c
        items.append({"id": f"math-{len(items):03d}", "question": question, "answer": str(c)})
    return items


def choice_items(skill: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice items: the question, three replies in a shuffled order, and the index of the correct one."""
    from rlhfchat.data import samples

    rng = random.Random(f"rlhfchat-eval:{seed}:{skill}")
    items, seen = [], set()
    while len(items) < n:
        task = samples.draw_task(rng, skill)
        question = samples.ask(task, rng)
        replies = [samples.reply(task, kind, rng) for kind in CHOICE_KINDS]
        if question in seen or len(set(replies)) < len(replies):
            continue
        seen.add(question)
        order = list(range(len(replies)))
        rng.shuffle(order)
        items.append({"id": f"{skill}-{len(items):03d}", "question": question,
                      "choices": [replies[i] for i in order], "label": order.index(0)})
    return items


def write(out_dir: Path, n: int = 50, seed: int = 0) -> dict[str, Path]:
    files = {"math": math_items(seed), "code": choice_items("code", n, seed),
             "grammar": choice_items("grammar", n, seed)}
    paths = {}
    for skill, items in files.items():
        paths[skill] = Path(out_dir) / f"{skill}.jsonl"
        with atomic_file(paths[skill]) as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhfchat.eval.tasks.build", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="items of the code and grammar tasks (math: one per "
                        "held-out problem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TASKS_DIR / "data")
    args = parser.parse_args(argv)
    for skill, path in write(args.out, args.n, args.seed).items():
        print(f"{skill}: {path}")


if __name__ == "__main__":
    main()
