"""`rlhfchat chat MODEL`: chat with a model in the terminal, the reply streaming as it is written.

    rlhfchat chat runs/tiny/ppo --temperature 0.7

Every reply goes to the feedback store, as the web page's and the Discord bot's do (--db; by default feedback.db in
the model's run folder, where `rlhfchat iterate` reads it), and /good or /bad rates the last one.

Type a message and press Enter. A line ending in a backslash continues on the next line; a line with only \"\"\"
starts and ends a block of several lines. Ctrl-C stops a reply (the part so far is kept) without leaving;
Ctrl-D or /quit leaves. Commands:

    /reset                 forget the conversation
    /system [TEXT|off]     show, set or remove the system prompt
    /set NAME VALUE        temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed (none = random)
    /save FILE             write the conversation as a canonical conversation record (JSONL)
    /good [COMMENT]        thumbs up on the last reply (stored with it); /bad [COMMENT]: thumbs down
    /help, /quit
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, TextIO

from rlhfchat.chat.request import add_sampling_arguments, sampling_params
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

SETTABLE = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")
HELP = __doc__.split("Commands:\n", 1)[1].rstrip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="a Hugging Face causal-LM folder (or LoRA adapter folder), or a hub id (the cached copy "
                             "when the hub cannot be reached)")
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt (default: the Vicuna one)")
    parser.add_argument("--db", default=None,
                        help="feedback database: a SQLAlchemy URL (postgresql://...) or a SQLite file path "
                             "(default: feedback.db in the model's run folder, else in the current folder)")
    add_sampling_arguments(parser)


class TerminalChat:
    """The chat loop, with input and output passed in (so tests can drive it)."""

    def __init__(self, engine: Any, system: str, params: Any, out: TextIO | None = None, store: Any = None):
        self.engine, self.system, self.params, self.store = engine, system, params, store
        self.out = out or sys.stdout  # looked up now: sys.stdout may have been replaced since import
        self.messages: list[dict[str, str]] = []
        self.conv: str | None = None  # the store's conversation, from the first stored reply
        self.last_reply: str | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        from rlhfchat.chat.engine import SamplingParams

        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.messages, self.conv, self.last_reply = [], None, None
            self.say("(conversation cleared)")
        elif name in ("good", "bad"):
            self.rate(name == "good", arg or None)
        elif name == "system":
            if arg:
                self.system = "" if arg == "off" else arg
                self.say("(system prompt removed)" if not self.system else "(system prompt set)")
            else:
                self.say(f"system prompt: {self.system or '(none)'}")
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTABLE or not value.strip():
                self.say(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
                return True
            try:
                parsed: Any = None if value.strip().lower() == "none" and key == "seed" else (
                    int(value) if key in ("top_k", "max_new_tokens", "seed") else float(value))
                self.params = SamplingParams(**{**dataclasses.asdict(self.params), key: parsed})
            except (ValueError, RlhfchatError) as e:
                self.say(f"error: {key}: {e}")
                return True
            self.say(f"({key} = {parsed})")
        elif name == "save":
            if not arg:
                self.say("usage: /save FILE")
                return True
            from rlhfchat.data.schema import conversation, write_jsonl

            record = conversation(f"terminal-{int(time.time())}", "terminal", self.conversation())
            write_jsonl(arg, [record])
            self.say(f"(conversation saved to {arg})")
        elif name == "help":
            self.say(HELP)
        else:
            self.say(f"unknown command /{name}; /help lists them")
        return True

    def rate(self, up: bool, comment: str | None) -> None:
        if self.store is None:
            self.say("(no feedback store: ratings are not kept)")
        elif self.last_reply is None:
            self.say("(no reply to rate yet)")
        else:
            self.store.thumb(self.last_reply, up, comment=comment)
            self.say(f"(thumbs {'up' if up else 'down'} on the last reply{', with your comment' if comment else ''})")

    def keep(self, req: Any) -> None:
        """Store a finished or stopped reply (a failed one has nothing to store)."""
        if self.store is None:
            return
        try:
            completion = req.result(10)
        except (RlhfchatError, TimeoutError):
            return
        if self.conv is None:
            self.conv = self.store.new_conversation("terminal")
        self.last_reply = self.store.add_reply(self.conv, completion)

    def reply(self, text: str) -> None:
        """Send a user message and stream the reply; Ctrl-C stops it and keeps what was written."""
        self.messages.append({"role": "user", "content": text})
        try:
            req = self.engine.submit(self.conversation(), self.params)
        except RlhfchatError as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return
        self.out.write("\n")
        pieces = []
        try:
            for piece in req:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            req.cancel()
            self.out.write(" [stopped]")
        except RlhfchatError as e:
            self.out.write(f"\nerror: {e}")
        self.out.write("\n\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.keep(req)

    def run(self, read: Callable[[str], str] = input) -> None:
        self.say(f"Chatting with {self.engine.name}. /help lists commands; Ctrl-C stops a reply; Ctrl-D leaves.")
        if self.store is not None:
            self.say(f"Replies and your /good and /bad ratings are stored in {self.store.safe_url()}.")
        while True:
            try:
                text = read_message(read)
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /quit leaves)")
                continue
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not self.command(text.strip()):
                    return
                continue
            self.reply(text)


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line; lines ending in a backslash joined; or a \"\"\" ... \"\"\" block."""
    line = read(">>> ")
    if line.strip() == '"""':
        lines = []
        while (line := read("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rlhfchat.chat.engine import load_engine, server_threads
    from rlhfchat.chat.feedback import FeedbackStore, default_db
    from rlhfchat.models import resolve_model

    source = resolve_model(args.model_dir)  # a folder, or a hub id (its cached copy offline): one line if neither

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    params = sampling_params(args)
    engine = load_engine(source, name=Path(args.model_dir).name, max_batch=1, max_queue=1, threads=server_threads())
    store = FeedbackStore(args.db or default_db([args.model_dir]))
    try:
        TerminalChat(engine, args.system, params, store=store).run()
    finally:
        engine.close()
        store.close()
