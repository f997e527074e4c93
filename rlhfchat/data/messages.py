"""Ordinary chat conversations: HF / TRL conversational datasets, ShareGPT, and the terminal chat's `/save` files.

Rows, any of:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
                    HF chat datasets, TRL's conversational language-modelling format, `rlhfchat chat`'s /save
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
                    ShareGPT (roles mapped by readers.SHAREGPT_ROLES: human/user -> user, gpt/assistant/chatgpt/
                    bing/bard/model -> assistant, system -> system)
    {"prompt": [messages], "completion": [messages]}
                    TRL's conversational prompt-completion format (the two lists joined)

    sft:     the conversation, cut after its last assistant message (a trailing user turn teaches nothing)
    prompts: the conversation up to its last user message (what the model is asked to continue)

Skipped and counted (an error with `strict: true`): a role outside the map (tool calls), a system message that
is not the first, an empty message, no assistant reply (sft) or no user message (prompts). Ids: the row's `id`
when it has one, else `messages-` + 16 hex digits of the sha1 of the conversation.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import UnsupportedRow, blank, drop, messages_field
from rlhfchat.data.schema import conversation, prompt_record
from rlhfchat.errors import RlhfchatError

NAME = "messages"
COLUMNS = ["id", "messages", "conversations", "prompt", "completion"]


def row_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a row in any of the layouts above (UnsupportedRow for a role outside the map)."""
    if row.get("messages") is not None:
        return messages_field(row, "messages", where)
    if row.get("conversations") is not None:
        return messages_field(row, "conversations", where)
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        return messages_field(row, "prompt", where) + messages_field(row, "completion", where)
    raise RlhfchatError(f"{where}: expected a 'messages' or 'conversations' list (or TRL's conversational "
                        f"'prompt' and 'completion'), found fields {', '.join(sorted(row)) or 'none'}")


def problem(messages: list[dict[str, str]]) -> str:
    """Why a conversation cannot be a canonical record, or ""."""
    if not messages:
        return "empty conversation"
    if any(m["role"] == "system" for m in messages[1:]):
        return "system message not first"
    if any(blank(m["content"]) for m in messages):
        return "empty message"
    return ""


def row_id(row: dict[str, Any], body: Any, name: str = NAME) -> str:
    """The row's own `id` (a string or an integer), else `name-` + 16 hex digits of the sha1 of `body`'s JSON."""
    given = row.get("id")
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given):
        return str(given)
    digest = hashlib.sha1(json.dumps(body, ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{name}-{digest}"


def _conversations(rows: Iterable[tuple[str, dict[str, Any]]], cfg: SourceConfig, stats: Counter):
    for where, row in rows:
        try:
            messages = row_messages(row, where)
        except UnsupportedRow as e:
            drop(cfg, stats, where, f"unsupported {e}")
            continue
        reason = problem(messages)
        if reason:
            drop(cfg, stats, where, reason)
            continue
        yield where, row, messages


def _cut_after_last(messages: list[dict[str, str]], role: str) -> list[dict[str, str]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == role), default=-1)
    return messages[: last + 1]


def sft(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for where, row, messages in _conversations(rows, cfg, stats):
        kept = _cut_after_last(messages, "assistant")
        if not any(m["role"] == "user" for m in kept):
            drop(cfg, stats, where, "no assistant reply" if not kept else "no user message")
            continue
        yield conversation(row_id(row, messages), NAME, kept)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for where, row, messages in _conversations(rows, cfg, stats):
        kept = _cut_after_last(messages, "user")
        if not kept:
            drop(cfg, stats, where, "no user message")
            continue
        yield prompt_record(row_id(row, messages), NAME, kept)
