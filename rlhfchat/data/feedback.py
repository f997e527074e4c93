"""Preferences collected from people chatting with a model, as exported by `rlhfchat feedback export`.

The export is already canonical: JSONL rows {"id", "source", "prompt": [messages], "chosen", "rejected"[, "margin"]}.

    preferences: the rows as they are (source set to "feedback", id kept)
    prompts:     their prompts

A row that is not a valid preference record is an error naming the line and the field.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.schema import preference, prompt_record, validate
from rlhfchat.errors import RlhfchatError

NAME = "feedback"
COLUMNS = ["id", "source", "prompt", "chosen", "rejected", "margin"]


def _records(rows, stats: Counter):
    for where, row in rows:
        rec = validate("preferences", row, where)
        if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
            raise RlhfchatError(f"{where}: field 'id' must be a string, got {type(rec['id']).__name__}")
        margin = rec.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise RlhfchatError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
        if rec["chosen"] == rec["rejected"]:
            stats["chosen equals rejected"] += 1
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in rec["prompt"]]
        yield str(rec["id"]), prompt, rec["chosen"], rec["rejected"], margin


def preferences(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, chosen, rejected, margin in _records(rows, stats):
        yield preference(id, NAME, prompt, chosen, rejected, margin)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, *_ in _records(rows, stats):
        yield prompt_record(id, NAME, prompt)
