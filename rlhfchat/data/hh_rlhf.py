"""Anthropic HH-RLHF: rows {chosen, rejected}, each a transcript of "\n\nHuman: " and "\n\nAssistant: " turns.

    preferences: prompt = the turns before the final assistant reply; chosen/rejected = the two final replies
    prompts:     the same prompt turns

A transcript is split at those markers only: "Human:" inside a sentence is text. A row whose two transcripts do not
share the prompt, or lack a final (non-empty) assistant reply, is skipped and counted; with `strict: true` it is an
error naming the row. Ids are `hh_rlhf-` + 16 hex digits of the sha1 of the two transcripts.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import text_field
from rlhfchat.data.schema import message, preference, prompt_record
from rlhfchat.errors import RlhfchatError

NAME = "hh_rlhf"
COLUMNS = ["chosen", "rejected"]
# A marker at the very end (an empty last turn, as in a few published rows) counts too.
_MARKER = re.compile(r"\n\n(Human|Assistant):(?: |$)")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """Turns of a transcript as messages, or None when text comes before the first marker."""
    if text.startswith(("Human: ", "Assistant: ")):
        text = "\n\n" + text
    parts = _MARKER.split(text)
    if parts[0].strip():
        return None
    return [message(_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _pairs(rows: Iterable[tuple[str, dict[str, Any]]], cfg: SourceConfig, stats: Counter):
    for where, row in rows:
        chosen_text = text_field(row, "chosen", where)
        rejected_text = text_field(row, "rejected", where)
        chosen, rejected = parse_transcript(chosen_text), parse_transcript(rejected_text)
        if chosen is None or rejected is None:
            reason = "text before the first turn"
        elif not _ends_with_reply(chosen) or not _ends_with_reply(rejected):
            reason = "no final assistant reply"
        elif chosen[:-1] != rejected[:-1]:
            reason = "chosen and rejected prompts differ"
        elif len(chosen) < 2:
            reason = "empty prompt"
        else:
            reason = ""
        if reason:
            if cfg.strict:
                raise RlhfchatError(f"{where}: {reason} (strict: true)")
            stats[reason] += 1
            continue
        if chosen[-1]["content"] == rejected[-1]["content"]:
            stats["chosen equals rejected"] += 1
            continue
        digest = hashlib.sha1(f"{chosen_text}\x00{rejected_text}".encode()).hexdigest()[:16]
        yield f"{NAME}-{digest}", chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _ends_with_reply(turns: list[dict[str, str]]) -> bool:
    return bool(turns) and turns[-1]["role"] == "assistant" and bool(turns[-1]["content"])


def preferences(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, chosen, rejected in _pairs(rows, cfg, stats):
        yield preference(id, NAME, prompt, chosen, rejected)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, _, _ in _pairs(rows, cfg, stats):
        yield prompt_record(id, NAME, prompt)
