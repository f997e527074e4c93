"""Preference pairs in TRL's standard formats: explicit or implicit prompt, plain text or conversational.

Rows, any of:
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}                      plain
    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}     conversational
    {"chosen": "The sky is blue.", "rejected": "The sky is green."}                           plain, implicit prompt
    {"chosen": [messages ... assistant], "rejected": [messages ... assistant]}                conversational, implicit
each with an optional numeric `margin` (how much better chosen is, as TRL's RewardTrainer reads it).

    preferences: prompt messages (a plain prompt becomes one user message), the chosen and the rejected reply
    prompts:     their prompts

An implicit prompt is what chosen and rejected share: the messages before the first that differs, or for plain
text the common beginning cut back to the last whitespace in it (so no word is split), as TRL's extract_prompt
does. A conversational completion must be one assistant message. Skipped and counted (an error with
`strict: true`): no shared prompt, a completion that is not one assistant reply, empty or equal replies, a role
outside readers.SHAREGPT_ROLES. Ids: the row's `id`, else `preferences-` + 16 hex digits of a sha1.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.messages import problem, row_id
from rlhfchat.data.readers import UnsupportedRow, blank, drop, field, messages_field
from rlhfchat.data.schema import message, preference, prompt_record
from rlhfchat.errors import RlhfchatError

NAME = "preferences"
COLUMNS = ["id", "prompt", "chosen", "rejected", "margin"]


def _common_text(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)) or len(a) != len(b):  # back off to a word boundary inside the shared part
        cut = max(a.rfind(" ", 0, n + 1), a.rfind("\n", 0, n + 1))
        n = cut if cut >= 0 else 0
    return a[:n]


def _split(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], Any, Any] | str:
    """(prompt messages, chosen, rejected) as given (strings or message lists), or a reason to skip."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise RlhfchatError(f"{where}: field {name!r} must be a string or a list of messages, got "
                                f"{type(value).__name__ if value is not None else 'nothing'}")
    if type(chosen) is not type(rejected):
        raise RlhfchatError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    prompt = row.get("prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            return [message("user", prompt.strip())], chosen, rejected
        return messages_field(row, "prompt", where), chosen, rejected
    if isinstance(chosen, str):  # plain text, implicit prompt
        shared = _common_text(chosen, rejected)
        if blank(shared):
            return "no shared prompt"
        return [message("user", shared.strip())], chosen[len(shared):], rejected[len(shared):]
    chosen_m, rejected_m = messages_field(row, "chosen", where), messages_field(row, "rejected", where)
    n = 0
    while n < min(len(chosen_m), len(rejected_m)) and chosen_m[n] == rejected_m[n]:
        n += 1
    if n == 0:
        return "no shared prompt"
    return chosen_m[:n], chosen_m[n:], rejected_m[n:]


def _reply(value: Any, where: str, name: str) -> str | None:
    """A completion as one reply text: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return value.strip()
    turns = messages_field({name: value}, name, where)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        return None
    return turns[0]["content"].strip()


def _pairs(rows: Iterable[tuple[str, dict[str, Any]]], cfg: SourceConfig, stats: Counter):
    for where, row in rows:
        try:
            split = _split(row, where)
            if isinstance(split, str):
                drop(cfg, stats, where, split)
                continue
            prompt, chosen, rejected = split
            chosen, rejected = _reply(chosen, where, "chosen"), _reply(rejected, where, "rejected")
        except UnsupportedRow as e:
            drop(cfg, stats, where, f"unsupported {e}")
            continue
        reason = problem(prompt) or ("no user message" if not any(m["role"] == "user" for m in prompt) else "")
        if not reason and (chosen is None or rejected is None):
            reason = "completion is not one assistant reply"
        elif not reason and (blank(chosen) or blank(rejected)):
            reason = "empty reply"
        elif not reason and chosen == rejected:
            reason = "chosen equals rejected"
        if reason:
            drop(cfg, stats, where, reason)
            continue
        margin = field(row, "margin", (int, float), where, optional=True)
        yield row_id(row, [prompt, chosen, rejected], NAME), prompt, chosen, rejected, margin


def preferences(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, chosen, rejected, margin in _pairs(rows, cfg, stats):
        yield preference(id, NAME, prompt, chosen, rejected, margin)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, *_ in _pairs(rows, cfg, stats):
        yield prompt_record(id, NAME, prompt)
