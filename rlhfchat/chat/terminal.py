"""`rlhfchat chat MODEL_DIR`: chat with a model in the terminal, the reply streaming as it is written.

    rlhfchat chat runs/tiny/ppo --temperature 0.7

Type a message and press Enter. A line ending in a backslash continues on the next line; a line with only \"\"\"
starts and ends a block of several lines. Ctrl-C stops a reply (the part so far is kept) without leaving;
Ctrl-D or /quit leaves. Commands:

    /reset                 forget the conversation
    /system [TEXT|off]     show, set or remove the system prompt
    /set NAME VALUE        temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed (none = random)
    /save FILE             write the conversation as a canonical conversation record (JSONL)
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
    add_sampling_arguments(parser)


class TerminalChat:
    """The chat loop, with input and output passed in (so tests can drive it)."""

    def __init__(self, engine: Any, system: str, params: Any, out: TextIO | None = None):
        self.engine, self.system, self.params = engine, system, params
        self.out = out or sys.stdout  # looked up now: sys.stdout may have been replaced since import
        self.messages: list[dict[str, str]] = []

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
            self.messages = []
            self.say("(conversation cleared)")
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

    def run(self, read: Callable[[str], str] = input) -> None:
        self.say(f"Chatting with {self.engine.name}. /help lists commands; Ctrl-C stops a reply; Ctrl-D leaves.")
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
    from rlhfchat.models import resolve_model

    source = resolve_model(args.model_dir)  # a folder, or a hub id (its cached copy offline): one line if neither

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    params = sampling_params(args)
    engine = load_engine(source, name=Path(args.model_dir).name, max_batch=1, max_queue=1, threads=server_threads())
    try:
        TerminalChat(engine, args.system, params).run()
    finally:
        engine.close()
