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
import gzip
import io
import json
import random
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlhfchat.atomic import atomic_file

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


# ----------------------------------------------------------------------------------------------------------------
# OASST1: message trees, one row per message.

_DETOX_KEYS = ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"]
_LABELS_ASSISTANT = ["spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
                     "sexual_content", "quality", "toxicity", "humor", "helpfulness", "creativity", "violence"]
_LABELS_PROMPTER = ["spam", "lang_mismatch", "pii", "not_appropriate", "hate_speech", "sexual_content", "quality",
                    "toxicity", "humor", "creativity", "violence"]
OASST1_SCHEMA = pa.schema([
    ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
    ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
    ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", pa.int32()),
    ("synthetic", pa.bool_()), ("model_name", pa.string()),
    ("detoxify", pa.struct([(k, pa.float64()) for k in _DETOX_KEYS])),
    ("message_tree_id", pa.string()), ("tree_state", pa.string()),
    ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
    ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int32()))])),
])
# A few non-English math trees: (question, answer sentence, evasive reply).
_FOREIGN = {"de": ("Was ist {a} {op} {b}?", "Die Antwort ist {c}.", "Ich weiß es nicht."),
            "es": ("¿Cuánto es {a} {op} {b}?", "La respuesta es {c}.", "No lo sé.")}
_FOLLOW_UP = ["Thanks! ", "Great, thank you. ", "OK. Next question. "]
_SPAM = ["Buy cheap watches at my shop!!!", "asdf asdf asdf", "Click here to win a prize."]


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class _Tree:
    """Builds the rows of one OASST1 message tree in creation order."""

    def __init__(self, rng: random.Random, users: list[str], start: datetime, lang: str):
        self.rng, self.users, self.clock, self.lang = rng, users, start, lang
        self.rows: list[dict[str, Any]] = []
        self.tree_id: str | None = None

    def add(self, text: str, role: str, parent: dict | None, level: int, rank: int | None = None,
            deleted: bool = False, review_ok: bool = True) -> dict[str, Any]:
        rng = self.rng
        self.clock += timedelta(minutes=rng.randint(5, 600), seconds=rng.randint(0, 59),
                                microseconds=rng.randint(0, 999999))
        mid = _uid(rng)
        self.tree_id = self.tree_id or mid
        reviews = rng.randint(3, 5)
        bad = 1.0 - level / 3
        detox = None if rng.random() < 0.1 else {
            k: round(rng.uniform(0.0001, 0.002) + (0.1 * bad * rng.random() if k in ("toxicity", "insult") else 0), 6)
            for k in _DETOX_KEYS}
        names = _LABELS_ASSISTANT if role == "assistant" else _LABELS_PROMPTER
        value = {"quality": 1 - bad * 0.8, "helpfulness": 1 - bad * 0.9, "fails_task": bad * 0.8,
                 "spam": 1.0 if level < 0 else 0.0}
        labels = None if rng.random() < 0.1 else {
            "name": names,
            "value": [round(min(1.0, max(0.0, value.get(n, 0.0) + rng.uniform(-0.1, 0.1))), 4) if n in value
                      else round(rng.uniform(0, 0.1), 4) for n in names],
            "count": [reviews] * len(names)}
        emojis = None if rng.random() < 0.3 else (
            {"name": ["+1", "_skip_labeling"], "count": [rng.randint(1, 9), 1]} if level >= 2
            else {"name": ["-1", "_skip_reply"], "count": [rng.randint(1, 9), rng.randint(1, 3)]})
        row = {"message_id": mid, "parent_id": parent["message_id"] if parent else None,
               "user_id": rng.choice(self.users),
               "created_date": self.clock.isoformat(), "text": text, "role": role, "lang": self.lang,
               "review_count": reviews, "review_result": review_ok, "deleted": deleted, "rank": rank,
               "synthetic": False, "model_name": None, "detoxify": detox, "message_tree_id": self.tree_id,
               "tree_state": "ready_for_export", "emojis": emojis, "labels": labels}
        self.rows.append(row)
        return row

    def replies(self, task: Task, parent: dict) -> dict[str, Any] | None:
        """Competing assistant replies to `parent`; returns the best one if it is good."""
        rng = self.rng
        if rng.random() < 0.12:  # a lone reply: nothing to rank it against
            kind = _sft_kind(rng)
            row = self.add(_reply(task, kind, rng), "assistant", parent, LEVEL[kind])
            return row if kind == "good" else None
        kinds = _sibling_kinds(rng)
        order = list(range(len(kinds)))
        rng.shuffle(order)  # written in creation order, not rank order
        rows = {i: self.add(_reply(task, kinds[i], rng), "assistant", parent, LEVEL[kinds[i]], rank=i)
                for i in order}
        if rng.random() < 0.08:  # came in after ranking: unranked
            self.add(_reply(task, "good", rng), "assistant", parent, 3)
        return rows[0] if kinds[0] == "good" else None


def _oasst1_trees(rng: random.Random, n_trees: int) -> list[list[dict[str, Any]]]:
    users = [_uid(rng) for _ in range(60)]
    start = datetime(2023, 2, 1, tzinfo=timezone.utc)
    trees = []
    for t in range(n_trees):
        start += timedelta(hours=rng.randint(1, 12))
        lang = "en" if t % 25 else ("de" if t % 50 else "es")
        tree = _Tree(rng, users, start, lang)
        if lang != "en":
            ask, answer, evasive = _FOREIGN[lang]
            f = _math_task(rng).fields
            root = tree.add(ask.format(**f), "prompter", None, 3)
            texts = [f"{f['a']} {f['op']} {f['b']} = {f['c']}. " + answer.format(**f), f"{f['c']}.", evasive]
            for rank in rng.sample(range(3), 3):
                tree.add(texts[rank], "assistant", root, 3 - rank, rank=rank)
            trees.append(tree.rows)
            continue
        task = _task(rng)
        root = tree.add(_ask(task, rng), "prompter", None, 3)
        best = tree.replies(task, root)
        if best is not None and rng.random() < 0.4:
            follow_task = _task(rng)
            follow = tree.add(rng.choice(_FOLLOW_UP) + _ask(follow_task, rng), "prompter", best, 3)
            tree.replies(follow_task, follow)
        if rng.random() < 0.06:  # deleted by a moderator, sometimes after someone answered it
            gone = tree.add(rng.choice(_SPAM), "assistant", root, -1, deleted=True)
            if rng.random() < 0.5:
                more = _task(rng)
                q = tree.add(_ask(more, rng), "prompter", gone, 3)
                tree.add(_reply(more, "good", rng), "assistant", q, 3)
        if rng.random() < 0.05:  # failed review
            tree.add(_reply(task, "repeated", rng), "assistant", root, 0, review_ok=False)
        trees.append(tree.rows)
    return trees


# ----------------------------------------------------------------------------------------------------------------
# GPT4All and Alpaca: instruction/response rows.

def _gpt4all_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        task = _task(rng)
        source = "pacovaldez/stackoverflow-questions" if task.skill == "code" else "laion/unified_chip2"
        rows.append({"prompt": _ask(task, rng), "response": _reply(task, _sft_kind(rng), rng), "source": source})
    return rows


_ALPACA_HEAD = ("Below is an instruction that describes a task{}. "
                "Write a response that appropriately completes the request.\n\n")


def _alpaca_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        task = _task(rng)
        instruction, inp = _ask_alpaca(task, rng)
        output = _reply(task, _sft_kind(rng), rng)
        if inp:
            text = (_ALPACA_HEAD.format(", paired with an input that provides further context")
                    + f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n{output}")
        else:
            text = _ALPACA_HEAD.format("") + f"### Instruction:\n{instruction}\n\n### Response:\n{output}"
        rows.append({"instruction": instruction, "input": inp, "output": output, "text": text})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# HH-RLHF and SHP: preference pairs.

def _hh_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        transcript = ""
        for _turn in range(rng.choices([0, 1, 2], [0.55, 0.35, 0.10])[0]):
            earlier = _task(rng)
            transcript += f"\n\nHuman: {_ask(earlier, rng)}\n\nAssistant: {_reply(earlier, 'good', rng)}"
        task = _task(rng)
        opener = rng.choice(_FOLLOW_UP) if transcript else ""
        transcript += f"\n\nHuman: {opener}{_ask(task, rng)}\n\nAssistant: "
        chosen, rejected = _pair_kinds(rng)
        rows.append({"chosen": transcript + _reply(task, chosen, rng),
                     "rejected": transcript + _reply(task, rejected, rng)})
    return rows


_SHP_DOMAIN = {"math": "askscience", "code": "askengineers", "grammar": "askacademia"}
_SHP_BODY = {"math": ["I am checking my homework.", "My kid asked me and I want to be sure.", "Quick question."],
             "code": ["I am learning Python.", "I am new to programming.", "This is for a class."],
             "grammar": ["I am writing an essay.", "English is not my first language.", "My teacher marked it."]}
_SCORE = {3: (100, 400), 2: (20, 50), 1: (4, 10), 0: (2, 3)}  # every pair has score_ratio >= 2


def _b36(rng: random.Random, width: int) -> str:
    return "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(width))


def _shp_rows(rng: random.Random, n_posts: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(domain, split, row) for every preference of every post; SHP splits by post, 90/5/5."""
    out = []
    t0 = 1609459200  # 2021-01-01
    for p in range(n_posts):
        task = _task(rng)
        split = "train" if p % 20 < 18 else ("validation" if p % 20 == 18 else "test")
        post_id, posted = _b36(rng, 6), t0 + rng.randint(0, 60_000_000)
        history = f"{_ask(task, rng)} {rng.choice(_SHP_BODY[task.skill])}"
        ratio = round(rng.uniform(0.8, 1.0), 2)
        # Better comments are written later (SHP keeps a preference only then), and score higher.
        comments, when = [], posted
        for kind in reversed(_sibling_kinds(rng)):
            when += rng.randint(30, 7200)
            comments.append({"id": _b36(rng, 7), "at": when, "score": rng.randint(*_SCORE[LEVEL[kind]]),
                             "text": _reply(task, kind, rng), "level": LEVEL[kind]})
        for i, worse in enumerate(comments):
            for better in comments[i + 1:]:
                a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
                out.append((_SHP_DOMAIN[task.skill], split, {
                    "post_id": post_id, "domain": f"{_SHP_DOMAIN[task.skill]}_{split}", "upvote_ratio": ratio,
                    "history": history, "c_root_id_A": a["id"], "c_root_id_B": b["id"],
                    "created_at_utc_A": a["at"], "created_at_utc_B": b["at"], "score_A": a["score"],
                    "score_B": b["score"], "human_ref_A": a["text"], "human_ref_B": b["text"],
                    "labels": int(a is better), "seconds_difference": float(better["at"] - worse["at"]),
                    "score_ratio": better["score"] / worse["score"]}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing.

def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path, "wb") as f:
        f.write(_jsonl_bytes(rows))


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:  # no name, no time
        gz.write(_jsonl_bytes(rows))
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _schema(*names: str) -> pa.Schema:
    return pa.schema([(n, pa.string()) for n in names])


SHP_SCHEMA = pa.schema([
    ("post_id", pa.string()), ("domain", pa.string()), ("upvote_ratio", pa.float64()), ("history", pa.string()),
    ("c_root_id_A", pa.string()), ("c_root_id_B", pa.string()), ("created_at_utc_A", pa.int64()),
    ("created_at_utc_B", pa.int64()), ("score_A", pa.int64()), ("score_B", pa.int64()),
    ("human_ref_A", pa.string()), ("human_ref_B", pa.string()), ("labels", pa.int64()),
    ("seconds_difference", pa.float64()), ("score_ratio", pa.float64()),
])
GPT4ALL_SCHEMA = _schema("prompt", "response", "source")
ALPACA_SCHEMA = _schema("instruction", "input", "output", "text")
HH_SCHEMA = _schema("chosen", "rejected")


def write_samples(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the six sample datasets (and a README) under `out_dir`; returns {dataset name: its folder}."""
    out_dir = Path(out_dir)
    rng = lambda name: random.Random(f"{seed}:{name}")  # one stream per dataset: editing one leaves the others
    table: list[tuple[str, ...]] = []  # README rows: folder, published as, used for, files, rows

    trees = _oasst1_trees(rng("oasst1"), 360)
    splits = {"train": [r for i, t in enumerate(trees) if i % 20 != 19 for r in t],
              "validation": [r for i, t in enumerate(trees) if i % 20 == 19 for r in t]}
    for split, rows in splits.items():
        _write_parquet(out_dir / "oasst1" / f"{split}.parquet", rows, OASST1_SCHEMA)
    table.append(("oasst1", "OpenAssistant/oasst1", "SFT; preferences from sibling ranks",
                  "train.parquet, validation.parquet",
                  f"{len(trees)} trees, {len(splits['train'])} + {len(splits['validation'])} messages"))

    rows = _gpt4all_rows(rng("gpt4all"), 800)
    _write_parquet(out_dir / "gpt4all" / "train.parquet", rows, GPT4ALL_SCHEMA)
    table.append(("gpt4all", "nomic-ai/gpt4all_prompt_generations", "SFT", "train.parquet", f"{len(rows)} rows"))

    rows = _alpaca_rows(rng("alpaca"), 800)
    _write_parquet(out_dir / "alpaca" / "train.parquet", rows, ALPACA_SCHEMA)
    table.append(("alpaca", "tatsu-lab/alpaca", "SFT", "train.parquet", f"{len(rows)} rows"))

    rows = _hh_rows(rng("hh_rlhf"), 800)
    hh = {"train": [r for i, r in enumerate(rows) if i % 10 != 9],
          "test": [r for i, r in enumerate(rows) if i % 10 == 9]}
    for split, part in hh.items():
        _write_jsonl_gz(out_dir / "hh_rlhf" / "helpful-base" / f"{split}.jsonl.gz", part)
    table.append(("hh_rlhf", "Anthropic/hh-rlhf", "preferences", "helpful-base/{train,test}.jsonl.gz",
                  f"{len(hh['train'])} + {len(hh['test'])} pairs"))

    shp = _shp_rows(rng("shp"), 360)
    files: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for domain, split, row in shp:
        files.setdefault((domain, split), []).append(row)
    for (domain, split), part in sorted(files.items()):
        _write_jsonl(out_dir / "shp" / domain / f"{split}.jsonl", part)
    n = {s: sum(len(v) for (_, split), v in files.items() if split == s) for s in ("train", "validation", "test")}
    table.append(("shp", "stanfordnlp/SHP", "preferences", f"{{{','.join(sorted(_SHP_DOMAIN.values()))}}}/"
                  "{train,validation,test}.jsonl", f"{n['train']} + {n['validation']} + {n['test']} pairs, 360 posts"))

    with atomic_file(out_dir / "README.md") as f:
        rows_md = "\n".join(f"| `{a}/` | `{b}` | {c} | `{d}` | {e} |" for a, b, c, d, e in table)
        f.write(_README.format(seed=seed, table=rows_md))
    return {name: out_dir / name for name, *_ in table}


_README = """# Sample data

Small synthetic stand-ins for the six StableVicuna data sources, written in their published formats so that the
data stage and the tiny pipeline run offline. Made by `rlhfchat/data/samples.py` (its docstring says what is in the
rows and why); do not edit by hand. Regenerate with

    python -m rlhfchat.data.samples data/sample --seed {seed}

and `tests/test_samples.py` checks that the result matches these files.

Three skills (basic math, small Python functions, grammar fixes), each answered well, tersely, wrongly or
unhelpfully. Instruction data is mostly good answers and never wrong; every preference prefers a correct and
better-formed answer. In all, about 2,000 instruction conversations and 2,100 English
preference pairs. Math is graded by `expected_math_answer(prompt)` (the last "A op B" in the question) and
`extract_answer(reply)` (the last integer in the reply), both in `rlhfchat/data/samples.py`.

| folder | published as | used for | files | rows |
|---|---|---|---|---|
{table}

OASST1 holds deleted messages (some with replies under them), messages that failed review, unranked replies and
a few German and Spanish trees, which an adapter should drop or filter by `lang`. SHP publishes its files as
`train.json` etc. holding JSON lines; here they are named `.jsonl`. Parquet row contents (not bytes) and gzip
contents are what stays the same across pyarrow and zlib versions.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhfchat.data.samples", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_samples(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
