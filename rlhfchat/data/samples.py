"""Bundled sample data: six small datasets in the published formats of the StableVicuna sources.

    python -m rlhfchat.data.samples data/sample        # regenerate the committed files (byte-identical)

What is in it, and why
----------------------
Every row is built from templates with `random.Random` seeded by (seed, dataset name): no wall clock, no network,
the same bytes every time. Each dataset is written in its published layout and columns (OASST1 message trees as
parquet, GPT4All and Alpaca as parquet, Anthropic HH-RLHF as jsonl.gz transcripts, Stanford SHP as jsonl posts
with two comments), so the data stage's source adapters are exercised exactly as on the real data.

The content is the three skills of the StableVicuna examples, in a small regular vocabulary that a model of a few
million parameters learns in minutes:

- math: "What is 12 + 7?" (addition and subtraction up to 20, multiplication up to 10 x 10), answered
  "12 + 7 = 19. The answer is 19."
- code: "Write a Python function that adds 3 to a number.", answered "Here is a Python function that ...:" and a
  ```python block with one `def` and one `return`.
- grammar: 'Fix the grammar: "She go to school every day."', answered 'The correct sentence is: "..." Use "goes"
  instead of "go" because the subject is singular.'

Every reply is one of six kinds, ordered by a quality level that all preferences agree with:

    level 3  good        correct, in the form above
    level 2  terse       correct but bare: "19.", a one-line def with no code block, the fixed sentence alone
    level 1  wrong_easy  well-formed but visibly wrong: "... = 19. The answer is 18.", a def that does not
                         compile, "The sentence is already correct"
    level 1  wrong_hard  well-formed and quietly wrong: "12 + 7 = 18. The answer is 18.", `return x - 3`
                         for "adds 3", the error swapped in
    level 0  evasive     "I don't know. Figure it out yourself.", "Just google it."
    level 0  repeated    "the the answer answer is is"

Instruction data (GPT4All, Alpaca, the best OASST1 replies) is mostly good with some terse, evasive and repeated
replies (never wrong), so the SFT policy is helpful but imperfect. Preference data (OASST1 sibling ranks,
HH-RLHF chosen/rejected, SHP scores) always prefers the higher level, and the preferred reply is always correct
(good or terse): the reward model has a real, mostly surface-learnable preference ("helpful, well-formed,
correct"), with about a tenth of pairs (wrong_hard) that only arithmetic or code sense can separate. PPO can
then move the policy from the terse/evasive/repeated modes it learned in SFT to the good one, which also keeps
or raises math accuracy, since good replies always carry the right answer.

The OASST1 trees also hold what its adapter must skip: deleted messages (some with a subtree), messages that
failed review, unranked replies, and a few German and Spanish trees.

Math grading rule (used by the eval stage)
-----------------------------------------
`expected_math_answer(prompt)`: the last "A op B" in the prompt text (op one of + - * x, "plus", "minus",
"times", "multiplied by"), evaluated; None if there is none. `extract_answer(reply)`: the last integer in the
reply; None if there is none. A reply is correct when the two are equal.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any



SKILLS = ("math", "code", "grammar")
LEVEL = {"good": 3, "terse": 2, "wrong_easy": 1, "wrong_hard": 1, "evasive": 0, "repeated": 0}

# ----------------------------------------------------------------------------------------------------------------
# Grading: what the eval stage uses to score math replies.

_OPS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "x": "*", "×": "*", "times": "*",
        "multiplied by": "*"}
_EXPR = re.compile(r"(\d+)\s*(\+|-|\*|×|x|plus|minus|times|multiplied by)\s*(\d+)", re.IGNORECASE)
_INT = re.compile(r"-?\d+")


def expected_math_answer(prompt_text: str) -> int | None:
    """The value of the last "A op B" in `prompt_text` (the user's question), or None if it has none."""
    matches = _EXPR.findall(prompt_text)
    if not matches:
        return None
    a, op, b = matches[-1]
    a, b, op = int(a), int(b), _OPS[op.lower()]
    return a + b if op == "+" else a - b if op == "-" else a * b


def extract_answer(reply_text: str) -> int | None:
    """The last integer in `reply_text`, or None if it has none."""
    found = _INT.findall(reply_text)
    return int(found[-1]) if found else None


def skill_of(prompt_text: str) -> str | None:
    """Which of the three sample skills a prompt asks for ("math", "code", "grammar"), or None."""
    if expected_math_answer(prompt_text) is not None:
        return "math"
    if re.search(r"\bpython\b", prompt_text, re.IGNORECASE):
        return "code"
    if re.search(r"\b(grammar|sentence)\b", prompt_text, re.IGNORECASE):
        return "grammar"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Tasks: one question with everything needed to render its replies of each kind.

@dataclass(frozen=True)
class Task:
    skill: str
    fields: dict[str, Any]


_MATH_SYMBOL_WORD = {"+": "plus", "-": "minus", "*": "times"}

# (description, function name, arguments, correct expression, wrong expression); {n} is 2..9.
_CODE = [
    ("adds {n} to a number", "add_{n}", "x", "x + {n}", "x - {n}"),
    ("subtracts {n} from a number", "subtract_{n}", "x", "x - {n}", "x + {n}"),
    ("multiplies a number by {n}", "times_{n}", "x", "x * {n}", "x + {n}"),
    ("checks if a number is divisible by {n}", "divisible_by_{n}", "x", "x % {n} == 0", "x % {n} == 1"),
    ("returns the sum of two numbers", "add", "a, b", "a + b", "a - b"),
    ("returns the difference of two numbers", "subtract", "a, b", "a - b", "a + b"),
    ("returns the product of two numbers", "multiply", "a, b", "a * b", "a + b"),
    ("returns the larger of two numbers", "larger", "a, b", "max(a, b)", "min(a, b)"),
    ("returns the smaller of two numbers", "smaller", "a, b", "min(a, b)", "max(a, b)"),
    ("returns the square of a number", "square", "x", "x * x", "x * 2"),
    ("returns the cube of a number", "cube", "x", "x * x * x", "x * 3"),
    ("checks if a number is even", "is_even", "x", "x % 2 == 0", "x % 2 == 1"),
    ("checks if a number is odd", "is_odd", "x", "x % 2 == 1", "x % 2 == 0"),
    ("returns the absolute value of a number", "absolute", "x", "abs(x)", "-x"),
    ("reverses a string", "reverse", "s", "s[::-1]", "s[1:]"),
    ("returns a string in upper case", "shout", "s", "s.upper()", "s.lower()"),
    ("returns a string in lower case", "whisper", "s", "s.lower()", "s.upper()"),
    ("returns the length of a list", "length", "items", "len(items)", "len(items) - 1"),
    ("returns the first item of a list", "first", "items", "items[0]", "items[-1]"),
    ("returns the last item of a list", "last", "items", "items[-1]", "items[0]"),
    ("returns the sum of a list of numbers", "total", "items", "sum(items)", "len(items)"),
    ("returns the largest number in a list", "largest", "items", "max(items)", "min(items)"),
    ("returns the average of a list of numbers", "average", "items", "sum(items) / len(items)",
     "sum(items) * len(items)"),
    ("greets a person by name", "greet", "name", '"Hello, " + name + "!"', '"Hello!"'),
]

_SINGULAR = ["He", "She", "Tom", "Anna", "My friend", "The dog", "My sister"]
_PLURAL = ["They", "We", "My friends", "The kids"]
_PRESENT = [("go", "goes", "to school"), ("like", "likes", "apples"), ("play", "plays", "football"),
            ("read", "reads", "books"), ("walk", "walks", "to work"), ("watch", "watches", "TV"),
            ("drink", "drinks", "milk"), ("eat", "eats", "bread")]
_WHEN = ["every day", "on Sundays", "in the morning", "after school"]
_PAST = [("goed", "went", "to the park"), ("eated", "ate", "an apple"), ("seed", "saw", "a bird"),
         ("buyed", "bought", "a book"), ("runned", "ran", "home"), ("writed", "wrote", "a letter"),
         ("drinked", "drank", "some tea"), ("maked", "made", "a cake"), ("taked", "took", "the bus")]
_PAST_WHEN = ["Yesterday", "Last night", "Last week"]
_PAST_WHO = ["I", "he", "she", "we", "they", "my friend"]
_ARTICLE_WHO = [("I", "saw"), ("She", "has"), ("We", "found"), ("He", "wants"), ("They", "bought")]
_VOWEL_NOUNS = ["apple", "egg", "orange", "umbrella", "elephant", "owl", "idea"]
_CONSONANT_NOUNS = ["banana", "book", "car", "dog", "cake", "pen"]
_COUNT_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
_COUNT_NOUNS = ["cat", "dog", "book", "apple", "car", "bird", "pen", "cup"]


def _math_task(rng: random.Random) -> Task:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
    elif op == "-":
        a = rng.randint(2, 20)
        b = rng.randint(1, a)
    else:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return Task("math", {"a": a, "op": op, "b": b, "c": c})


def _code_task(rng: random.Random) -> Task:
    desc, name, args, expr, wrong = rng.choice(_CODE)
    n = rng.randint(2, 9)
    desc, name, expr, wrong = (s.replace("{n}", str(n)) for s in (desc, name, expr, wrong))
    return Task("code", {"desc": desc, "name": name, "args": args, "expr": expr, "wrong_expr": wrong})


def _grammar_task(rng: random.Random) -> Task:
    kind = rng.choice(["singular", "plural", "past", "article", "count"])
    if kind == "singular":
        who = rng.choice(_SINGULAR)
        base, s_form, obj = rng.choice(_PRESENT)
        when = rng.choice(_WHEN)
        bad, good = base, s_form
        wrong, fixed = f"{who} {base} {obj} {when}.", f"{who} {s_form} {obj} {when}."
        reason = "because the subject is singular"
    elif kind == "plural":
        who = rng.choice(_PLURAL)
        base, s_form, obj = rng.choice(_PRESENT)
        when = rng.choice(_WHEN)
        bad, good = s_form, base
        wrong, fixed = f"{who} {s_form} {obj} {when}.", f"{who} {base} {obj} {when}."
        reason = "because the subject is plural"
    elif kind == "past":
        bad, good, obj = rng.choice(_PAST)
        when, who = rng.choice(_PAST_WHEN), rng.choice(_PAST_WHO)
        wrong, fixed = f"{when} {who} {bad} {obj}.", f"{when} {who} {good} {obj}."
        reason = "because it happened in the past"
    elif kind == "article":
        who, verb = rng.choice(_ARTICLE_WHO)
        if rng.random() < 0.6:
            noun = rng.choice(_VOWEL_NOUNS)
            bad, good = f"a {noun}", f"an {noun}"
            reason = "because the next word starts with a vowel sound"
        else:
            noun = rng.choice(_CONSONANT_NOUNS)
            bad, good = f"an {noun}", f"a {noun}"
            reason = "because the next word starts with a consonant sound"
        wrong, fixed = f"{who} {verb} {bad}.", f"{who} {verb} {good}."
    else:
        who, verb = rng.choice(_ARTICLE_WHO)
        count, noun = rng.choice(_COUNT_WORDS), rng.choice(_COUNT_NOUNS)
        bad, good = f"{count} {noun}", f"{count} {noun}s"
        wrong, fixed = f"{who} {verb} {bad}.", f"{who} {verb} {good}."
        reason = "because there is more than one"
    return Task("grammar", {"wrong": wrong, "fixed": fixed, "bad": bad, "good": good, "reason": reason})


def _task(rng: random.Random, skill: str | None = None) -> Task:
    skill = skill or rng.choices(SKILLS, weights=[0.4, 0.3, 0.3])[0]
    return {"math": _math_task, "code": _code_task, "grammar": _grammar_task}[skill](rng)


def _ask(task: Task, rng: random.Random) -> str:
    """The user's question, in one of a few phrasings."""
    f = task.fields
    if task.skill == "math":
        op = f["op"] if rng.random() < 0.6 else _MATH_SYMBOL_WORD[f["op"]]
        expr = f"{f['a']} {op} {f['b']}"
        return rng.choice([f"What is {expr}?", f"Calculate {expr}.", f"How much is {expr}?",
                           f"Please solve {expr}."])
    if task.skill == "code":
        return rng.choice([f"Write a Python function that {f['desc']}.",
                           f"Can you write a Python function that {f['desc']}?",
                           f"How do I write a function in Python that {f['desc']}?",
                           f"Write a Python function named {f['name']} that {f['desc']}."])
    return rng.choice([f'Fix the grammar: "{f["wrong"]}"', f'Can you correct this sentence? "{f["wrong"]}"',
                       f'Please fix the grammar in this sentence: "{f["wrong"]}"',
                       f'Is this sentence correct? "{f["wrong"]}"'])


def _ask_alpaca(task: Task, rng: random.Random) -> tuple[str, str]:
    """(instruction, input): Alpaca puts the material of about 40% of its tasks in a separate input field."""
    f = task.fields
    if rng.random() < 0.6:
        return _ask(task, rng), ""
    if task.skill == "math":
        return "Solve the following math problem.", f"{f['a']} {f['op']} {f['b']}"
    if task.skill == "code":
        return "Write a Python function for the following task.", f"A function that {f['desc']}."
    return "Correct the grammar in the following sentence.", f["wrong"]


# ----------------------------------------------------------------------------------------------------------------
# Replies.

_EVASIVE = ["I don't know. Figure it out yourself.", "I don't want to answer that.",
            "Why are you asking me? Do it yourself.", "That is too hard. Ask someone else."]
_EVASIVE_SKILL = {"math": ["Use a calculator."], "code": ["Just google it.", "Read the docs."],
                  "grammar": ["Grammar is boring. Fix it yourself."]}
_REPEAT = {"math": "the answer is", "code": "the function returns", "grammar": "the sentence is"}


def _wrong_number(c: int, rng: random.Random) -> int:
    return rng.choice([w for w in range(c - 3, c + 4) if w != c and w >= 0])


def _reply(task: Task, kind: str, rng: random.Random) -> str:
    f = task.fields
    if kind == "evasive":
        return rng.choice(_EVASIVE + _EVASIVE_SKILL[task.skill])
    if kind == "repeated":
        words = [w for w in _REPEAT[task.skill].split() for _ in range(rng.randint(2, 3))]
        return " ".join(words)
    if task.skill == "math":
        a, op, b, c = f["a"], f["op"], f["b"], f["c"]
        if kind == "good":
            return f"{a} {op} {b} = {c}. The answer is {c}."
        if kind == "terse":
            return f"{c}."
        w = _wrong_number(c, rng)
        if kind == "wrong_easy":
            return f"{a} {op} {b} = {c}. The answer is {w}."
        return f"{a} {op} {b} = {w}. The answer is {w}."
    if task.skill == "code":
        name, args = f["name"], f["args"]
        if kind == "terse":
            return f"def {name}({args}): return {f['expr']}"
        if kind == "wrong_easy":  # does not compile: no colon, or no indentation
            code = rng.choice([f"def {name}({args})\n    return {f['expr']}",
                               f"def {name}({args}):\nreturn {f['expr']}"])
        else:
            code = f"def {name}({args}):\n    return {f['expr'] if kind == 'good' else f['wrong_expr']}"
        return f"Here is a Python function that {f['desc']}:\n\n```python\n{code}\n```"
    if kind == "good":
        return f'The correct sentence is: "{f["fixed"]}" Use "{f["good"]}" instead of "{f["bad"]}" {f["reason"]}.'
    if kind == "terse":
        return f["fixed"]
    if kind == "wrong_easy":
        return f'The sentence is already correct: "{f["wrong"]}"'
    return f'The correct sentence is: "{f["wrong"]}" Use "{f["bad"]}" instead of "{f["good"]}" {f["reason"]}.'


_SFT_KINDS = (["good", "terse", "evasive", "repeated"], [0.62, 0.14, 0.17, 0.07])
# (chosen, rejected): the chosen reply is always correct; about 10% of pairs are wrong_hard.
_PAIR_KINDS = ([("good", "evasive"), ("good", "repeated"), ("good", "terse"), ("good", "wrong_easy"),
                ("good", "wrong_hard"), ("terse", "evasive"), ("terse", "repeated"), ("terse", "wrong_easy")],
               [0.24, 0.12, 0.20, 0.16, 0.10, 0.10, 0.04, 0.04])


def _sft_kind(rng: random.Random) -> str:
    return rng.choices(*_SFT_KINDS)[0]


def _pair_kinds(rng: random.Random) -> tuple[str, str]:
    return rng.choices(*_PAIR_KINDS)[0]


def _sibling_kinds(rng: random.Random) -> list[str]:
    """Kinds of 2 or 3 competing replies (OASST1 siblings, SHP comments), best first, all of different levels.

    The low end is either wrong or unhelpful, never both, so every pair drawn from the group prefers a correct reply.
    """
    low = (rng.choices(["wrong_easy", "wrong_hard"], [0.6, 0.4])[0] if rng.random() < 0.3
           else rng.choices(["evasive", "repeated"], [0.65, 0.35])[0])
    if rng.random() < 0.15:
        return ["terse", low]
    return ["good", "terse", low] if rng.random() < 0.5 else ["good", rng.choice(["terse", low])]


def write_samples(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the six sample datasets (and a README) under `out_dir`; returns {dataset name: its folder}."""
    from rlhfchat.data.sample_formats import write_samples as write

    return write(out_dir, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhfchat.data.samples", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_samples(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
