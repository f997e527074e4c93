"""Canonical records, the contract between the data stage and everything after it.

- Conversation: {"id", "source", "messages": [{"role": "system|user|assistant", "content"}, ...]}
- Preference:   {"id", "source", "prompt": [messages...], "chosen": str, "rejected": str, "margin"?: float}
- Prompt:       {"id", "source", "prompt": [messages...], "reference"?: str}
- Unpaired:     {"id", "source", "prompt": [messages...], "completion": str, "label": bool}   one reply judged good
                (true) or bad: KTO's examples, written by `rlhfchat iterate` from thumbs (not a kind of the data stage)

`reference` is the checkable answer of a prompt where its source has one (GSM8K's `#### N`, the sample data's math
questions): verifiable rewards and exact-match evaluation compare a reply's final answer with it
(`rlhfchat.data.answers`). Each source adapter (oasst1.py, gpt4all.py, ...) yields these; nothing downstream knows the sources.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhfchat.atomic import atomic_file
from rlhfchat.errors import RlhfchatError

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "preferences", "prompts")


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conversation(id: str, source: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"id": id, "source": source, "messages": messages}


def preference(id: str, source: str, prompt: list[dict[str, str]], chosen: str, rejected: str,
               margin: float | None = None) -> dict[str, Any]:
    rec = {"id": id, "source": source, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if margin is not None:
        rec["margin"] = float(margin)
    return rec


def prompt_record(id: str, source: str, prompt: list[dict[str, str]], reference: str | None = None
                  ) -> dict[str, Any]:
    rec = {"id": id, "source": source, "prompt": prompt}
    if reference is not None:
        rec["reference"] = str(reference)
    return rec


def unpaired(id: str, source: str, prompt: list[dict[str, str]], completion: str, label: bool) -> dict[str, Any]:
    return {"id": id, "source": source, "prompt": prompt, "completion": completion, "label": bool(label)}


def _check_messages(msgs: Any, where: str, field: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise RlhfchatError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RlhfchatError(
                f"{where}: {field}[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}, got {m!r}"
            )


def validate(kind: str, rec: Any, where: str) -> dict[str, Any]:
    """Check a canonical record of `kind`; `where` names the file and line for the error."""
    if not isinstance(rec, dict):
        raise RlhfchatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    required = {"sft": ("id", "source", "messages"), "preferences": ("id", "source", "prompt", "chosen", "rejected"),
                "prompts": ("id", "source", "prompt")}[kind]
    for key in required:
        if key not in rec:
            raise RlhfchatError(f"{where}: missing field {key!r} (a {kind} record has {', '.join(required)})")
    if kind == "sft":
        _check_messages(rec["messages"], where, "messages")
    else:
        _check_messages(rec["prompt"], where, "prompt")
    if kind == "prompts" and "reference" in rec and not isinstance(rec["reference"], str):
        raise RlhfchatError(f"{where}: field 'reference' must be a string, got {type(rec['reference']).__name__}")
    if kind == "preferences":
        for key in ("chosen", "rejected"):
            if not isinstance(rec[key], str):
                raise RlhfchatError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec


def record_key(kind: str, rec: dict[str, Any]) -> str:
    """What makes two records exact duplicates (ids and sources aside; a prompt's reference counts)."""
    if kind == "sft":
        body: Any = rec["messages"]
    elif kind == "preferences":
        body = [rec["prompt"], rec["chosen"], rec["rejected"]]
    else:
        body = [rec["prompt"], rec["reference"]] if "reference" in rec else rec["prompt"]
    return hashlib.sha1(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one compact JSON object a line; returns the count."""
    n = 0
    with atomic_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: str | Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Read a JSONL file of canonical records, validating each when `kind` is given."""
    path = Path(path)
    if not path.is_file():
        raise RlhfchatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RlhfchatError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            yield validate(kind, rec, f"{path} line {lineno}") if kind else rec
