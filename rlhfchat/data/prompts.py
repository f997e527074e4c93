"""Plain prompt lists: what to ask the model during RL, without answers.

Rows, any of:
    {"prompt": "What is 2 + 3?"}                               plain (TRL's prompt-only format)
    {"prompt": [{"role": "user", "content": ...}, ...]}        conversational (TRL's, or OpenAI messages)
    {"messages": [...]} / {"conversations": [...]}             a conversation, cut after its last user message
each with an optional `reference` (a string or a number: the checkable answer, as GSM8K's, that verifiable rewards
and exact-match evaluation compare a reply with) and an optional `system` string put before a plain prompt.

    prompts: [user: prompt] (or the conversation as given), with its reference when the row has one

Skipped and counted (an error with `strict: true`): an empty prompt, a conversation without a user message, a
role outside readers.SHAREGPT_ROLES. Ids: the row's `id`, else `prompts-` + 16 hex digits of the prompt's sha1.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.messages import problem, row_id, row_messages
from rlhfchat.data.readers import UnsupportedRow, blank, drop, field, messages_field, text_field
from rlhfchat.data.schema import message, prompt_record

NAME = "prompts"
COLUMNS = ["id", "prompt", "messages", "conversations", "reference", "system"]


def _prompt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if isinstance(row.get("prompt"), str):
        system = text_field(row, "system", where, optional=True)
        turns = [message("system", system)] if not blank(system) else []
        return [*turns, message("user", row["prompt"])]
    if isinstance(row.get("prompt"), list):
        return messages_field(row, "prompt", where)
    return row_messages(row, where)


def _reference(row: dict[str, Any], where: str) -> str | None:
    value = field(row, "reference", (str, int, float), where, optional=True)
    return None if value is None else str(value)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for where, row in rows:
        try:
            turns = _prompt(row, where)
        except UnsupportedRow as e:
            drop(cfg, stats, where, f"unsupported {e}")
            continue
        last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
        turns = turns[: last_user + 1]
        reason = "no user message" if not turns else problem(turns)
        if reason:
            drop(cfg, stats, where, "empty prompt" if reason == "empty message" else reason)
            continue
        yield prompt_record(row_id(row, turns, NAME), NAME, turns, reference=_reference(row, where))
