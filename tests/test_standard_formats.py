"""The standard-format sources (messages, preferences, prompts) on rows in HF / TRL / ShareGPT layouts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlhfchat.config import SourceConfig
from rlhfchat.data import messages, preferences, prompts
from rlhfchat.data.readers import read_rows
from rlhfchat.data.schema import validate
from rlhfchat.errors import RlhfchatError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(module, kind: str, path: Path, **options):
    stats: Counter = Counter()
    cfg = SourceConfig(source=module.NAME, path=str(path), **options)
    records = list(getattr(module, kind)(read_rows(str(path), columns=module.COLUMNS), cfg, stats))
    for i, rec in enumerate(records):
        validate(kind, rec, f"record {i}")
    return records, stats


U = {"role": "user", "content": "What is 2 + 3?"}
A = {"role": "assistant", "content": "2 + 3 = 5."}
S = {"role": "system", "content": "Be brief."}


def test_messages_reads_hf_chat_rows_sharegpt_and_trl_prompt_completion(tmp_path):
    path = _jsonl(tmp_path / "chats.jsonl", [
        {"id": "c1", "messages": [S, U, A]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "Bye"}]},  # a trailing user turn is cut for SFT
        {"prompt": [U], "completion": [A]},
        {"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]},  # content parts
        {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"}]},
        {"messages": [U, S, A]},  # a system message that is not first
        {"messages": [{"role": "user", "content": "  "}, A]},
        {"messages": [{"role": "assistant", "content": "Hello, I am a bot."}]},  # no user message
    ])
    records, stats = run(messages, "sft", path)
    assert [r["messages"] for r in records] == [
        [S, U, A],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [U, A],
        [U, {"role": "assistant", "content": "5"}],
    ]
    assert records[0]["id"] == "c1" and records[1]["id"].startswith("messages-")
    assert stats == Counter({"unsupported role 'function_call'": 1, "system message not first": 1,
                             "empty message": 1, "no user message": 1})
    asked, _ = run(messages, "prompts", path)
    assert asked[1]["prompt"][-1] == {"role": "user", "content": "Bye"}
    assert asked[0]["prompt"] == [S, U]


def test_messages_reads_back_what_the_terminal_chat_saves(tmp_path):
    from rlhfchat.data.schema import conversation, write_jsonl

    path = tmp_path / "saved.jsonl"
    write_jsonl(path, [conversation("terminal-1", "terminal", [U, A])])  # what /save writes
    records, _ = run(messages, "sft", path)
    assert records == [{"id": "terminal-1", "source": "messages", "messages": [U, A]}]


def test_messages_strict_and_malformed_rows_are_one_line_errors(tmp_path):
    bad_role = _jsonl(tmp_path / "a.jsonl", [{"messages": [U, A]}, {"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(RlhfchatError, match=r"a.jsonl line 2: unsupported role 'tool' \(strict: true\)"):
        run(messages, "sft", bad_role, strict=True)
    no_list = _jsonl(tmp_path / "b.jsonl", [{"text": "just text"}])
    with pytest.raises(RlhfchatError, match=r"b.jsonl line 1: expected a 'messages' or 'conversations' list"):
        run(messages, "sft", no_list)
    no_content = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(RlhfchatError, match=r"c.jsonl line 1: messages\[0\].content must be a string, got int"):
        run(messages, "sft", no_content)


def test_preferences_in_every_trl_layout(tmp_path):
    path = _jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2},  # plain
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "2 + 3 = 6."}]},  # conv.
        {"chosen": "The sky is blue.", "rejected": "The sky is black."},  # plain, implicit prompt
        {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "No idea."}]},  # conv., implicit
        {"chosen": "Yes.", "rejected": "No."},  # nothing shared
        {"prompt": [U], "chosen": [A, U], "rejected": [A]},  # a completion of two messages
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
    ])
    records, stats = run(preferences, "preferences", path)
    got = [(r["prompt"], r["chosen"], r["rejected"], r.get("margin")) for r in records]
    assert got == [
        ([{"role": "user", "content": "The sky is"}], "blue.", "green.", 2.0),
        ([U], "2 + 3 = 5.", "2 + 3 = 6.", None),
        ([{"role": "user", "content": "The sky is"}], "blue.", "black.", None),  # no word is split
        ([U], "2 + 3 = 5.", "No idea.", None),
    ]
    assert stats == Counter({"no shared prompt": 1, "completion is not one assistant reply": 1,
                             "chosen equals rejected": 1})
    asked, _ = run(preferences, "prompts", path)
    assert [p["prompt"] for p in asked] == [r["prompt"] for r in records]


def test_preferences_type_errors_name_the_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(RlhfchatError, match=r"p.jsonl line 1: field 'rejected' must be a string or a list of "
                                            r"messages, got nothing"):
        run(preferences, "preferences", path)
    mixed = _jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": [A]}])
    with pytest.raises(RlhfchatError, match="both be strings or both message lists"):
        run(preferences, "preferences", mixed)


def test_prompts_plain_conversational_and_with_references(tmp_path):
    path = _jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What is 2 + 3?", "reference": 5},
        {"prompt": "Summarise this.", "system": "Be brief."},
        {"prompt": [S, U, A, {"role": "user", "content": "And 3 + 4?"}], "reference": "7"},
        {"messages": [U, A]},  # a conversation: the prompt is what comes before the reply
        {"prompt": ""},
        {"id": 17, "prompt": "Hello"},
    ])
    records, stats = run(prompts, "prompts", path)
    assert [(r["prompt"], r.get("reference")) for r in records] == [
        ([U], "5"),
        ([S, {"role": "user", "content": "Summarise this."}], None),
        ([S, U, A, {"role": "user", "content": "And 3 + 4?"}], "7"),
        ([U], None),
        ([{"role": "user", "content": "Hello"}], None),
    ]
    assert records[-1]["id"] == "17"
    assert stats == Counter({"empty prompt": 1})
    bad = _jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "reference": [1]}])
    with pytest.raises(RlhfchatError, match=r"b.jsonl line 1: field 'reference' must be str or int or float"):
        run(prompts, "prompts", bad)


def test_recipes_accept_the_standard_sources():
    from rlhfchat.config import load_recipe

    r = load_recipe(None, ["data.sft=[{source: messages, path: a.jsonl}]",
                           "data.preferences=[{source: preferences, path: b.jsonl}]",
                           "data.prompts=[{source: prompts, path: c.jsonl}]"])
    assert [s.source for s in (r.data.sft + r.data.preferences + r.data.prompts)] == ["messages", "preferences",
                                                                                      "prompts"]
    with pytest.raises(RlhfchatError, match="data.sft\\[0\\].source: unknown source 'prompts'"):
        load_recipe(None, ["data.sft=[{source: prompts, path: a.jsonl}]"])
