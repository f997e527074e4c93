"""Alpaca (tatsu-lab/alpaca and its format): rows {instruction, input, output[, text]}.

    sft:     [user: instruction (+ "\n\n" + input when input is not empty), assistant: output];
             rows with an empty output are skipped ("empty output")
    prompts: [user: instruction (+ input)]

`input` may be missing or null (read as ""). Ids are `alpaca-` + 16 hex digits of the sha1 of the three fields.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import blank, text_field
from rlhfchat.data.schema import conversation, message, prompt_record

NAME = "alpaca"
COLUMNS = ["instruction", "input", "output"]


def _rows(rows: Iterable[tuple[str, dict[str, Any]]], stats: Counter) -> Iterator[tuple[str, str, str]]:
    for where, row in rows:
        instruction = text_field(row, "instruction", where)
        extra = text_field(row, "input", where, optional=True)
        output = text_field(row, "output", where)
        if blank(instruction):
            stats["empty instruction"] += 1
            continue
        if blank(output):
            stats["empty output"] += 1
            continue
        user = f"{instruction}\n\n{extra}" if not blank(extra) else instruction
        digest = hashlib.sha1(f"{instruction}\x00{extra}\x00{output}".encode()).hexdigest()[:16]
        yield f"{NAME}-{digest}", user, output


def sft(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, user, output in _rows(rows, stats):
        yield conversation(id, NAME, [message("user", user), message("assistant", output)])


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, user, _ in _rows(rows, stats):
        yield prompt_record(id, NAME, [message("user", user)])
