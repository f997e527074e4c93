"""`rlhfchat chat`: streaming, multi-line input, the /commands and Ctrl-C, on the tiny model."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from rlhfchat.chat.engine import ChatEngine, SamplingParams
from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.chat.terminal import TerminalChat
from rlhfchat.data.schema import read_jsonl


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = ChatEngine(tiny_model_dir, max_batch=2, max_queue=2)
    yield e
    e.close()


def chat_with(engine, lines, out=None, params=None, store=None):
    out = out or io.StringIO()
    feed = iter(lines)

    def read(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    chat = TerminalChat(engine, "Be brief.", params or SamplingParams(temperature=0, max_new_tokens=12), out,
                        store=store)
    chat.run(read)
    return chat, out.getvalue()


def test_replies_stream_and_input_can_span_lines(engine):
    chat, out = chat_with(engine, ["first line \\", "second line", '"""', "a block", "of two lines", '"""'])
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users == ["first line \nsecond line", "a block\nof two lines"]
    replies = [m["content"] for m in chat.messages if m["role"] == "assistant"]
    assert len(replies) == 2 and all(r in out for r in replies)
    assert "... " in out  # the continuation prompt


def test_commands(engine, tmp_path):
    saved = tmp_path / "chat.jsonl"
    chat, out = chat_with(engine, [
        "/system You are terse.", "hello", "/set temperature 0.5", "/set top_k 7", "/set seed none",
        "/set max_new_tokens 4", "/set bogus 1", "/set temperature hot", "/save " + str(saved), "/system",
        "/help", "/nope", "/reset", "/system off", "/quit", "never read",
    ])
    p = chat.params
    assert (p.temperature, p.top_k, p.seed, p.max_new_tokens) == (0.5, 7, None, 4)
    assert "usage: /set NAME VALUE" in out and "error: temperature:" in out and "unknown command /nope" in out
    assert "system prompt: You are terse." in out and "/save FILE" in out
    assert chat.messages == [] and chat.system == ""
    [record] = list(read_jsonl(saved, kind="sft"))  # a canonical conversation record
    assert record["source"] == "terminal"
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][0]["content"] == "You are terse." and record["messages"][1]["content"] == "hello"


class CtrlCWhileReplying(io.StringIO):
    """Output that raises KeyboardInterrupt (as Ctrl-C would) when the first piece of the first reply is shown."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.fired = False

    def write(self, s: str) -> int:
        if s == "\n" and not self.fired:
            self.armed = True  # reply() writes a newline, then the pieces
        elif self.armed and s.strip() and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_a_reply_without_leaving(engine):
    out = CtrlCWhileReplying()
    chat, text = chat_with(engine, ["tell me a long story", "and another"], out=out,
                           params=SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    assert out.fired and "[stopped]" in text
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "user", "assistant"]  # the chat went on after Ctrl-C
    assert len(chat.messages[3]["content"]) > len(chat.messages[1]["content"])
    assert engine.load() == {"running": 0, "waiting": 0}  # the stopped reply is not decoding any more


def test_the_chat_command_end_to_end(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlhfchat.cli", "chat", str(tiny_model_dir), "--temperature", "0",
                        "--max-new-tokens", "8"], input="hello\n/save out.jsonl\n/quit\n", capture_output=True,
                       text=True, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Chatting with" in r.stdout and "conversation saved" in r.stdout
    assert f"stored in sqlite:///{tmp_path / 'feedback.db'}" in r.stdout  # not a run's model: the current folder
    [record] = list(read_jsonl(tmp_path / "out.jsonl", kind="sft"))
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]


def test_replies_and_ratings_go_to_the_feedback_store(engine, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    chat, out = chat_with(engine, ["/good", "What is 2 + 3?", "/bad It is 5.", "/reset", "hello", "/good"],
                          store=store)
    assert "(no reply to rate yet)" in out and "thumbs down on the last reply, with your comment" in out
    assert store.counts() == {"conversations": 2, "replies": 2, "thumbs": 2, "arena_votes": 0}  # /reset: a new one
    thumbs = store.thumbs()
    first, second = (store.reply(t["reply_id"]) for t in thumbs)
    assert [(t["value"], t["comment"]) for t in thumbs] == [(-1, "It is 5."), (1, None)]
    assert first["prompt"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is 2 + 3?"}]
    assert second["prompt"][-1]["content"] == "hello" and first["model"] == engine.name
    assert chat_with(engine, ["/good"])[1].count("no feedback store") == 1
    store.close()
