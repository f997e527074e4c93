"""The Discord bot's pure pieces: message splitting that keeps code blocks whole, the cooldown and concurrency gate,
thread history as chat messages, mention stripping and user-id hashing. No discord.py, no I/O: tested directly.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

MESSAGE_LIMIT = 2000
"""Discord's limit on one message's content, in characters."""
FENCE = "```"
THUMBS = {"👍": True, "👎": False}


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`text` as Discord messages of at most `limit` characters, cut at line breaks.

    A code block that has to be cut is closed at the end of one message and reopened (with its language) at the
    start of the next, so every message renders its code as code; a block the text leaves open is closed.
    A single line longer than a message is cut at a space where there is one. Text that fits and has balanced
    fences comes back unchanged, as one message; empty text gives []."""
    close = "\n" + FENCE
    chunks: list[str] = []
    lines: list[str] = []  # the message being filled
    size = 0  # len("\n".join(lines))
    body = 0  # lines in the message besides a reopened fence
    fence: str | None = None  # the opening line of the code block the last line is in, if any
    opened = False  # the last line opened that block

    def flush() -> None:
        nonlocal lines, size, body, opened
        if opened and lines[-1].strip() == fence:  # a block opening on the last line: open it in the next message
            lines.pop()
            body -= 1
            chunk = "\n".join(lines)
        else:
            chunk = "\n".join(lines) + (close if fence else "")
        if body and chunk.strip():
            chunks.append(chunk)
        lines = [fence] if fence else []
        size, body, opened = len(fence or ""), 0, False

    for line in text.split("\n"):
        toggles = line.count(FENCE) % 2 == 1
        after = (None if fence else _opener(line)) if toggles else fence  # the block state after this line
        while True:
            sep = 1 if lines else 0
            if size + sep + len(line) + (len(close) if after else 0) <= limit:
                lines.append(line)
                size += sep + len(line)
                body += 1
                opened = toggles and fence is None
                break
            if body:  # start a new message and try again there
                flush()
                continue
            # the line alone is too long for a message: cut off what fits, carry on with the rest
            room = limit - size - sep - (len(close) if fence else 0)
            cut = line.rfind(" ", 0, room + 1)
            cut = cut if cut > room // 2 else room
            lines.append(line[:cut])
            body += 1
            line = line[cut:].lstrip(" ")
            flush()
            if not line:
                break
        fence = after
    flush()
    return chunks


def _opener(line: str) -> str:
    """The fence line that reopens a block opened by `line`: "```python" for "```python", else "```"."""
    lang = line[line.rfind(FENCE) + len(FENCE):].strip()
    ok = line.lstrip().startswith(FENCE) and len(lang) <= 20 and re.fullmatch(r"[\w+#.-]*", lang)
    return FENCE + lang if ok else FENCE


class Gate:
    """Who may start a reply now: a per-user cooldown between requests, a bound on replies written at once, and one
    reply at a time per conversation. `enter` returns None and counts the reply (call `leave(key)` when it is done),
    or the sentence to tell the user."""

    def __init__(self, cooldown_s: float, max_concurrent: int, clock: Callable[[], float] = time.monotonic):
        if max_concurrent < 1:
            raise RlhfchatError(f"--max-concurrent: expected an integer >= 1, got {max_concurrent}")
        if cooldown_s < 0:
            raise RlhfchatError(f"--cooldown: expected seconds >= 0, got {cooldown_s}")
        self.cooldown_s, self.max_concurrent, self.clock = cooldown_s, max_concurrent, clock
        self._last: dict[int, float] = {}  # user id -> when their last reply started
        self._active: set[Any] = set()  # conversation keys with a reply being written

    @property
    def active(self) -> int:
        return len(self._active)

    def enter(self, user_id: int, key: Any) -> str | None:
        now = self.clock()
        wait = self._last.get(user_id, -float("inf")) + self.cooldown_s - now
        if wait > 0:
            return f"Slow down a little: you can ask again in {max(1, round(wait))} s."
        if key in self._active:
            return "I'm still writing the reply to the last message here; send yours once it is finished."
        if len(self._active) >= self.max_concurrent:
            return (f"I'm busy writing {len(self._active)} other replies right now. Please try again in a minute.")
        self._active.add(key)
        self._last[user_id] = now
        if len(self._last) > 10_000:  # forget users whose cooldown is long over
            self._last = {u: t for u, t in self._last.items() if now - t < self.cooldown_s}
        return None

    def leave(self, key: Any) -> None:
        self._active.discard(key)


@dataclass
class Turn:
    """One thread message as the prompt sees it."""

    role: str  # "user" or "assistant"
    content: str
    reply_id: str | None = None
    """For the bot's messages: the stored reply the message shows (all parts of a split reply share it)."""


def build_history(opening: str | None, turns: list[Turn], system: str = SYSTEM_PROMPT,
                  reply_texts: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The chat messages for a thread: the system prompt, the opening question (which lives outside the thread, in
    the message the thread was started from), then the thread's turns in order.

    The parts of a split reply are one assistant turn, with the stored reply's exact text where `reply_texts` has it.
    Each user message stays a turn of its own, so the engine's truncation can drop the oldest ones one by one;
    empty user messages (an image alone) are left out."""
    reply_texts = reply_texts or {}
    out: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    last_reply: str | None = None
    for turn in ([Turn("user", opening)] if opening else []) + turns:
        text = turn.content.strip()
        if turn.role == "user":
            if text:
                out.append({"role": "user", "content": text})
            last_reply = None
            continue
        stored = turn.reply_id is not None and turn.reply_id in reply_texts
        if turn.reply_id is not None and turn.reply_id == last_reply:  # a later part of the same reply
            if not stored:
                out[-1]["content"] += "\n" + text
        else:
            out.append({"role": "assistant", "content": reply_texts[turn.reply_id] if stored else text})
        last_reply = turn.reply_id
    return out


def strip_mentions(text: str, user_id: int, role_ids: tuple[int, ...] = ()) -> str:
    """The message without mentions of the bot (as a user, or through its own role)."""
    text = re.sub(rf"<@!?{user_id}>", "", text)
    for role in role_ids:
        text = text.replace(f"<@&{role}>", "")
    return text.strip()


def hash_user(user_id: int, salt: str) -> str:
    """The id stored with a thumb or a conversation: a salted SHA-256 of the Discord user id."""
    return "discord:" + hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()[:32]


def thread_name(question: str) -> str:
    """A thread title from the question's first line (Discord allows 100 characters)."""
    line = " ".join(question.split("\n", 1)[0].split())
    return (line[:90] + "…" if len(line) > 90 else line) or "chat"


def _emoji(name: str) -> str:
    """👍🏽 -> 👍: skin tones and the emoji variation selector do not change the vote."""
    return re.sub("[\U0001F3FB-\U0001F3FF\uFE0F]", "", name)
