"""The content of the bundled sample data: tasks, replies of six quality kinds, and the math grading rules.

    python -m rlhfchat.data.sample_formats data/sample      # regenerate the committed files (byte-identical)

This module holds what the rows say; `sample_formats.py` lays them out as each dataset is published and writes the
files. What is in it, and why
----------------------------
Every row is built from templates with `random.Random` seeded by (seed, dataset name): no wall clock, no network,
the same bytes every time. Seven datasets in their published layouts and columns: OASST1 message trees, GPT4All,
Alpaca (parquet), Anthropic HH-RLHF (jsonl.gz transcripts), Stanford SHP (jsonl posts with two comments) and
openai/gsm8k (parquet question/answer rows), so the source adapters are exercised exactly as on the real data.

The content is the three skills of the StableVicuna examples, in a small regular vocabulary that a model of a few
million parameters learns in minutes:

- math: "What is 17 + 8?" (addition and subtraction up to 20, multiplication up to 10 x 10; drawn 40/40/20),
  answered with a worked solution that splits a two-digit operand into tens and units (`worked`):
  "17 + 8 = 10 + 7 + 8 = 10 + 15 = 25. The answer is 25." Every step is a one-digit fact or adds tens, so a
  problem never seen can be solved from facts seen in other problems' steps (a product is a fact of its own).
- code: "Write a Python function that adds 3 to a number.", answered "Here is a Python function that ...:" and a
  ```python block with one `def` and one `return`.
- grammar: 'Fix the grammar: "She go to school every day."', answered 'The correct sentence is: "..." Use "goes"
  instead of "go" because the subject is singular.'

Every reply is one of six kinds, ordered by a quality level that all preferences agree with:

    level 3  good        correct, in the form above
    level 2  terse       correct but bare: "25.", a one-line def with no code block, the fixed sentence alone
    level 1  wrong_easy  well-formed but visibly wrong: "... = 25. The answer is 24.", a def that does not
                         compile, "The sentence is already correct"
    level 1  wrong_hard  well-formed and quietly wrong: "... = 10 + 15 = 24. The answer is 24.", `return x - 3`
                         for "adds 3", the error swapped in
    level 0  evasive     "I don't know. Figure it out yourself.", "Just google it."
    level 0  repeated    "the the answer answer is is"

Instruction data (GPT4All, Alpaca, the best OASST1 replies) is mostly good with some terse, evasive and repeated
replies (never wrong), so the SFT policy is helpful but imperfect; the GSM8K rows are all worked solutions.
Preference data (OASST1 sibling ranks, HH-RLHF chosen/rejected, SHP scores) always prefers the higher level, and
the preferred reply is always correct (good or terse): the reward model has a real, mostly surface-learnable
preference ("helpful, well-formed, correct"), with about a tenth of pairs (wrong_hard) that only arithmetic or
code sense can separate.

The OASST1 trees also hold what its adapter must skip: deleted messages (some with a subtree), messages that
failed review, unranked replies, and a few German and Spanish trees.

Held-out math
-------------
`held_out_problems()` is a pool of sums and differences (30% of those with a worked solution that are no step of
another problem's) that no train split holds in any phrasing ("plus" and "+", "12 + 7" and "7 + 12" are one problem,
`problem_key`), not even as a step. The validation and test splits (OASST1 validation, HH-RLHF test, SHP
validation and test, GSM8K test) and the `rlhfchat_math` eval task draw their math from it alone, every train
split from the other problems: a recipe that trains on train splits and evaluates on the others measures problems
its model has never seen.

Math grading rule (used by the eval stage)
-----------------------------------------
`expected_math_answer(prompt)`: the last "A op B" in the prompt text (op one of + - * x, "plus", "minus",
"times", "multiplied by"), evaluated; None if there is none. `extract_answer(reply)`: the last integer in the
reply; None if there is none. A reply is correct when the two are equal. (Prompt records of the GSM8K rows carry
their `reference`, which `rlhfchat.data.answers` compares with a reply's final answer.)
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
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
# Math problems: worked solutions, one key per problem, and the pool held out of every training split.

Problem = tuple[int, str, int]
HELD_OUT_SHARE = 0.3
"""Share of each operator's composite problems held out of every training split (`held_out_problems`)."""
RL_SHARE = 0.3
"""Share of each operator's composite problems kept for RL prompts (`rl_problems`): only GSM8K's train split states
them, with their answers, and no split that shows a worked solution of them."""
# Every "A op B" in a text, overlapping ones too ("10 + 7 + 8" holds 10 + 7 and 7 + 8), not inside a longer number.
_PAIRS = re.compile(r"(?=(?<![\d.])(\d+)\s*(\+|-|\*|×|x|plus|minus|times|multiplied by)\s*(\d+))", re.IGNORECASE)


def problem_key(a: int, op: str, b: int) -> Problem:
    """One key per problem however it is written: the operator as a symbol ("plus" and "+" are one, "times", "x"
    and "*" too) and the operands of + and * in increasing order ("12 + 7" and "7 plus 12" are one problem)."""
    op = _OPS[op.lower()]
    return (min(a, b), op, max(a, b)) if op in "+*" else (a, op, b)


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _parts(n: int) -> list[int]:
    """17 -> [10, 7], 20 -> [20], 7 -> [7]."""
    return [x for x in (n - n % 10, n % 10) if x] or [0]


def worked(a: int, op: str, b: int) -> str:
    """The worked solution "a op b = ... = c": a problem with a two-digit operand is split into tens and units, so
    that each step is a one-digit fact or adds tens; a one-digit problem is a fact of its own.

        17 + 8  = 10 + 7 + 8 = 10 + 15 = 25        13 - 7  = 10 - 7 + 3 = 3 + 3 = 6
        17 + 14 = 10 + 10 + 7 + 4 = 20 + 11 = 31    17 - 12 = 17 - 10 - 2 = 7 - 2 = 5
        17 - 4  = 10 + 7 - 4 = 10 + 3 = 13          13 * 4  = 10 * 4 + 3 * 4 = 40 + 12 = 52
    """
    steps = [f"{a} {op} {b}"]
    if op == "+":
        terms = _parts(a) + _parts(b)
        tens, units = [x for x in terms if x >= 10], [x for x in terms if x < 10]
        if len(terms) > 2:
            steps.append(" + ".join(map(str, tens + units)))
            if len(tens) > 1 or len(units) > 1:
                steps.append(f"{sum(tens)} + {sum(units)}")
    elif op == "-" and a > 10:
        tens, units = a - a % 10, a % 10
        if b > 10 and b % 10:
            steps += [f"{a} - {b - b % 10} - {b % 10}", f"{a - b + b % 10} - {b % 10}"]
        elif b < 10 and b <= units:
            steps += [f"{tens} + {units} - {b}", f"{tens} + {units - b}"]
        elif b < 10 and units:
            steps += [f"{tens} - {b} + {units}", f"{tens - b} + {units}"]
        elif b < 10:  # 20 - 7
            steps += [f"{tens - 10} + 10 - {b}", f"{tens - 10} + {10 - b}"]
    return " = ".join(steps + [str(solve(a, op, b))])


def all_problems() -> dict[str, list[Problem]]:
    """Every problem `draw_math` can draw, by operator: a + b and a - b up to 20 (b <= a), a * b up to 10 x 10."""
    pairs = {"+": [(a, b) for a in range(1, 21) for b in range(1, 21)],
             "-": [(a, b) for a in range(2, 21) for b in range(1, a + 1)],
             "*": [(a, b) for a in range(1, 11) for b in range(1, 11)]}
    return {op: sorted({problem_key(a, op, b) for a, b in ab}) for op, ab in pairs.items()}


@functools.cache
def _composite_ranked() -> dict[str, list[Problem]]:
    """Per operator, the problems whose worked solution has steps and that are no step of another problem's, in the
    order of the sha1 of "a op b" (held_out_problems takes the first, rl_problems the next)."""
    family = all_problems()
    steps = set()
    for op, keys in family.items():
        for a, _, b in keys:
            steps |= math_problems(worked(a, op, b)) - {problem_key(a, op, b)}
    ranked = {}
    for op, keys in family.items():
        composite = {(a, o, b) for a, o, b in keys if worked(a, o, b).count(" = ") > 1}
        ranked[op] = sorted(composite - steps, key=lambda k: hashlib.sha1(f"{k[0]} {k[1]} {k[2]}".encode()).hexdigest())
    return ranked


@functools.cache
def rl_problems() -> frozenset[Problem]:
    """The problems of RL prompts: the next RL_SHARE of each operator's candidates after the held-out ones (see
    held_out_problems). GSM8K's train split (questions with their `#### N` answers: RL prompts with references)
    draws from these alone, and no other split states them: a model fine-tuned on the other train splits has seen
    none of them solved, so RL on them is RL on new problems, as an RL dataset is, and they are not the held-out ones."""
    out = set()
    for ranked in _composite_ranked().values():
        n = round(len(ranked) * HELD_OUT_SHARE)
        out.update(ranked[n : n + round(len(ranked) * RL_SHARE)])
    return frozenset(out)


@functools.cache
def held_out_problems() -> frozenset[Problem]:
    """The problems no training split holds, in any phrasing or order, not even as a step of a worked solution.

    The candidates are the problems whose worked solution has steps and that occur in no other problem's worked
    solution (so not the one-digit facts, nor "10 + 15", a step of 17 + 8, nor the products, which are facts): they
    can only be solved by composing facts learnt elsewhere. Of each
    operator's candidates, the HELD_OUT_SHARE whose sha1 of "a op b" comes first are held out. The test and
    validation splits of the sample data and the `rlhfchat_math` eval task draw from these alone, every train split
    from the other problems."""
    held = set()
    for ranked in _composite_ranked().values():
        held.update(ranked[:round(len(ranked) * HELD_OUT_SHARE)])
    return frozenset(held)


def math_problems(text: str, answer: int | str | None = None) -> set[Problem]:
    """The keys of the problems `text` states: every "A op B" in it, overlapping ones too; and, given the `answer`
    of a text that states none (a word problem: "Tom has 12 apples and buys 7 more."), every A op B of two of its
    numbers, in order, that equals the answer (conservative: 2 and 2 with answer 4 are both 2 + 2 and 2 * 2)."""
    found = {problem_key(int(a), op, int(b)) for a, op, b in _PAIRS.findall(text)}
    if found or answer is None:
        return found
    want = int(answer)
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            found.update(problem_key(a, op, b) for op in "+-*" if solve(a, op, b) == want)
    return found


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


def pool_of(key: Problem) -> str:
    """Which pool a problem is in: held_out, rl or train (every other problem)."""
    return "held_out" if key in held_out_problems() else "rl" if key in rl_problems() else "train"


def draw_math(rng: random.Random, held_out: bool = False, pool: str | None = None) -> Task:
    """A problem of the training pool (neither held out nor kept for RL), or with `held_out` one of
    `held_out_problems()`, or of the pool named by `pool` (train, held_out, rl)."""
    pool = pool or ("held_out" if held_out else "train")
    while True:
        op = rng.choices("+-*", [0.4, 0.4, 0.2])[0]
        if op == "+":
            a, b = rng.randint(1, 20), rng.randint(1, 20)
        elif op == "-":
            a = rng.randint(2, 20)
            b = rng.randint(1, a)
        else:
            a, b = rng.randint(1, 10), rng.randint(1, 10)
        if pool_of(problem_key(a, op, b)) == pool:
            return Task("math", {"a": a, "op": op, "b": b, "c": solve(a, op, b), "worked": worked(a, op, b)})


def draw_code(rng: random.Random) -> Task:
    desc, name, args, expr, wrong = rng.choice(_CODE)
    n = rng.randint(2, 9)
    desc, name, expr, wrong = (s.replace("{n}", str(n)) for s in (desc, name, expr, wrong))
    return Task("code", {"desc": desc, "name": name, "args": args, "expr": expr, "wrong_expr": wrong})


def draw_grammar(rng: random.Random) -> Task:
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


def draw_task(rng: random.Random, skill: str | None = None, held_out: bool = False) -> Task:
    """A task of `skill` (by default drawn 40/30/30); `held_out` draws math from the held-out pool."""
    skill = skill or rng.choices(SKILLS, weights=[0.5, 0.25, 0.25])[0]
    if skill == "math":
        return draw_math(rng, held_out)
    return {"code": draw_code, "grammar": draw_grammar}[skill](rng)


def ask(task: Task, rng: random.Random) -> str:
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


def ask_alpaca(task: Task, rng: random.Random) -> tuple[str, str]:
    """(instruction, input): Alpaca puts the material of about 40% of its tasks in a separate input field."""
    f = task.fields
    if rng.random() < 0.6:
        return ask(task, rng), ""
    if task.skill == "math":
        return "Solve the following math problem.", f"{f['a']} {f['op']} {f['b']}"
    if task.skill == "code":
        return "Write a Python function for the following task.", f"A function that {f['desc']}."
    return "Correct the grammar in the following sentence.", f["wrong"]


# GSM8K-style rows: a question (a short word problem, or a bare one as above) and a worked answer ending "#### N".
_NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia"]
_THINGS = ["apple", "pen", "book", "marble", "sticker", "cookie"]
# (question, worked line) per operator; {x} is "{a} {things}" with the right plural.
_WORD_PROBLEMS = {
    "+": [("{name} has {a_things}. {name} gets {b} more. How many {things} does {name} have now?",
           "{name} has {expr} {things} now."),
          ("There are {a_things} in one box and {b} in another. How many {things} are there in both boxes?",
           "There are {expr} {things} in both boxes.")],
    "-": [("{name} has {a_things} and gives {b} of them away. How many {things} does {name} have left?",
           "{name} has {expr} {things} left."),
          ("A shelf holds {a_things}. {name} takes {b} of them. How many {things} are still on the shelf?",
           "There are {expr} {things} still on the shelf.")],
    "*": [("{name} buys {a_bags} with {b} {things} in each bag. How many {things} does {name} buy?",
           "{name} buys {expr} {things}."),
          ("A box holds {a_rows} of {b} {things}. How many {things} are in the box?",
           "The box holds {expr} {things}.")],
}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def gsm8k_row(task: Task, rng: random.Random) -> dict[str, str]:
    """A math task as openai/gsm8k publishes a row: {question, answer}, the answer's worked line carrying the
    calculator annotation `<<a+b=c>>` and its last line `#### c`. Half are word problems, half bare questions."""
    f = task.fields
    a, op, b, c = f["a"], f["op"], f["b"], f["c"]
    expr = f"{f['worked'].rsplit(' = ', 1)[0]} = <<{a}{op}{b}={c}>>{c}"
    if rng.random() < 0.5:
        return {"question": ask(task, rng), "answer": f"{expr}.\n#### {c}"}
    question, line = rng.choice(_WORD_PROBLEMS[op])
    thing = rng.choice(_THINGS)
    words = {"name": rng.choice(_NAMES), "things": thing + "s", "a_things": _count(a, thing), "b": b,
             "a_bags": _count(a, "bag"), "a_rows": _count(a, "row"), "expr": expr}
    return {"question": question.format(**words), "answer": line.format(**words) + f"\n#### {c}"}


# ----------------------------------------------------------------------------------------------------------------
# Replies.

_EVASIVE = ["I don't know. Figure it out yourself.", "I don't want to answer that.",
            "Why are you asking me? Do it yourself.", "That is too hard. Ask someone else."]
_EVASIVE_SKILL = {"math": ["Use a calculator."], "code": ["Just google it.", "Read the docs."],
                  "grammar": ["Grammar is boring. Fix it yourself."]}
_REPEAT = {"math": "the answer is", "code": "the function returns", "grammar": "the sentence is"}


def _wrong_number(c: int, rng: random.Random) -> int:
    return rng.choice([w for w in range(c - 3, c + 4) if w != c and w >= 0])


def reply(task: Task, kind: str, rng: random.Random) -> str:
    f = task.fields
    if kind == "evasive":
        return rng.choice(_EVASIVE + _EVASIVE_SKILL[task.skill])
    if kind == "repeated":
        words = [w for w in _REPEAT[task.skill].split() for _ in range(rng.randint(2, 3))]
        return " ".join(words)
    if task.skill == "math":
        c, chain = f["c"], f["worked"]
        if kind == "good":
            return f"{chain}. The answer is {c}."
        if kind == "terse":
            return f"{c}."
        w = _wrong_number(c, rng)
        if kind == "wrong_easy":
            return f"{chain}. The answer is {w}."
        return f"{chain.rsplit(' = ', 1)[0]} = {w}. The answer is {w}."  # the last step goes wrong
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


_SFT_KINDS = (["good", "terse", "evasive", "repeated"], [0.72, 0.1, 0.12, 0.06])
# (chosen, rejected): the chosen reply is always correct; about 10% of pairs are wrong_hard.
_PAIR_KINDS = ([("good", "evasive"), ("good", "repeated"), ("good", "terse"), ("good", "wrong_easy"),
                ("good", "wrong_hard"), ("terse", "evasive"), ("terse", "repeated"), ("terse", "wrong_easy")],
               [0.24, 0.12, 0.20, 0.16, 0.10, 0.10, 0.04, 0.04])


def sft_kind(rng: random.Random) -> str:
    return rng.choices(*_SFT_KINDS)[0]


def pair_kinds(rng: random.Random) -> tuple[str, str]:
    return rng.choices(*_PAIR_KINDS)[0]


def sibling_kinds(rng: random.Random) -> list[str]:
    """Kinds of 2 or 3 competing replies (OASST1 siblings, SHP comments), best first, all of different levels.

    The low end is either wrong or unhelpful, never both, so every pair drawn from the group prefers a correct reply.
    """
    low = (rng.choices(["wrong_easy", "wrong_hard"], [0.6, 0.4])[0] if rng.random() < 0.3
           else rng.choices(["evasive", "repeated"], [0.65, 0.35])[0])
    if rng.random() < 0.15:
        return ["terse", low]
    return ["good", "terse", low] if rng.random() < 0.5 else ["good", rng.choice(["terse", low])]
