"""GSM8K (openai/gsm8k, configs `main` and `socratic`): rows {question, answer}.

The published `answer` is a worked solution whose lines carry calculator annotations and whose last line is the
final answer:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72

(`socratic` puts a sub-question before each step: "How many clips did Natalia sell in May? ** Natalia sold ...").

    sft:     [user: question, assistant: the solution without its <<...>> annotations, the last line written as
             "The answer is 72."]
    prompts: [user: question], with `reference` the final answer ("72": thousands separators dropped)

Rows whose answer has no `#### N` line are skipped ("no final answer"). Ids are `gsm8k-` + the first 16 hex digits
of the sha1 of the question and answer. Reading: parquet or JSON lines as published (`main/train-*.parquet`); a hub
id with `subset: main` or `socratic`; for a local clone of the repository, `subset` names its folder too.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.answers import canonical, parse_number
from rlhfchat.data.readers import blank, text_field
from rlhfchat.data.schema import conversation, message, prompt_record

NAME = "gsm8k"
COLUMNS = ["question", "answer"]
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"^\s*####\s*(.+?)\s*$")


def split_answer(answer: str) -> tuple[str, str] | None:
    """A published answer -> (the worked solution without annotations or the final line, the final answer), or None
    when its last non-empty line is not `#### N` with a number N."""
    lines = answer.rstrip().splitlines()
    if not lines:
        return None
    m = _FINAL.match(lines[-1])
    value = parse_number(m.group(1).lstrip("$")) if m else None
    if value is None:
        return None
    steps = "\n".join(_ANNOTATION.sub("", line).rstrip() for line in lines[:-1]).strip()
    return steps, canonical(value)


def solution_text(steps: str, final: str) -> str:
    """What the model learns to write: the steps, then "The answer is N." (the form the math checks read)."""
    return f"{steps}\nThe answer is {final}." if steps else f"The answer is {final}."


def _rows(rows: Iterable[tuple[str, dict[str, Any]]], stats: Counter) -> Iterator[tuple[str, str, str, str]]:
    for where, row in rows:
        question = text_field(row, "question", where)
        answer = text_field(row, "answer", where)
        if blank(question):
            stats["empty question"] += 1
            continue
        parts = split_answer(answer)
        if parts is None:
            stats["no final answer"] += 1
            continue
        digest = hashlib.sha1(f"{question}\x00{answer}".encode()).hexdigest()[:16]
        yield f"{NAME}-{digest}", question.strip(), *parts


def sft(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, question, steps, final in _rows(rows, stats):
        yield conversation(id, NAME, [message("user", question), message("assistant", solution_text(steps, final))])


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, question, _, final in _rows(rows, stats):
        yield prompt_record(id, NAME, [message("user", question)], reference=final)
