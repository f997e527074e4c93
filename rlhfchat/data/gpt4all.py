"""GPT4All prompt generations (nomic-ai/gpt4all_prompt_generations): rows {prompt, response, source}.

    sft:     [user: prompt, assistant: response]; rows with an empty response are skipped ("empty response")
    prompts: [user: prompt]

Ids are `gpt4all-` + the first 16 hex digits of the sha1 of the prompt and response (the rows have no ids).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import blank, text_field
from rlhfchat.data.schema import conversation, message, prompt_record

NAME = "gpt4all"
COLUMNS = ["prompt", "response"]


def _rows(rows: Iterable[tuple[str, dict[str, Any]]], stats: Counter) -> Iterator[tuple[str, str, str]]:
    for where, row in rows:
        prompt = text_field(row, "prompt", where)
        response = text_field(row, "response", where)
        if blank(prompt):
            stats["empty prompt"] += 1
            continue
        if blank(response):
            stats["empty response"] += 1
            continue
        digest = hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:16]
        yield f"{NAME}-{digest}", prompt, response


def sft(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, response in _rows(rows, stats):
        yield conversation(id, NAME, [message("user", prompt), message("assistant", response)])


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, _ in _rows(rows, stats):
        yield prompt_record(id, NAME, [message("user", prompt)])
