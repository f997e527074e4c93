"""Fake discord objects, a stub engine that streams a fixed reply, and the bot they drive: what tests/test_discord_bot.py
runs DiscordBot's own handlers with (no network)."""

from __future__ import annotations

import asyncio
import itertools
import time

import discord

from rlhfchat.chat.discord_bot import DiscordBot
from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.chat.request import Request, SamplingParams

_ids = itertools.count(10_000)


# ---------------------------------------------------------------------------------------------- fakes
class User:
    def __init__(self, id: int, bot: bool = False, name: str = "user"):
        self.id, self.bot, self.display_name, self.name = id, bot, name, name

    def __str__(self) -> str:
        return self.name


BOT = User(1, bot=True, name="rlhfchat")
ALICE, BOB = User(101, name="alice"), User(102, name="bob")
OTHER_BOT = User(7, bot=True, name="otherbot")


class Guild:
    id, name = 55, "test guild"


class Channel:
    """A text channel or a thread: what the handlers send, and the messages in it."""

    def __init__(self, type=discord.ChannelType.text, id: int | None = None):
        self.id = id or next(_ids)
        self.type, self.guild = type, Guild()
        self.messages: list[Message] = []
        self.sends: list[dict] = []  # every send's keyword arguments, content included
        self.threads: list[Channel] = []

    async def send(self, content, **kw):
        self.sends.append({"content": content, **kw})
        return Message(self, BOT, content)

    async def history(self, limit=100, before=None):  # newest first, like discord.py
        older = [m for m in self.messages if before is None or m.id < before.id]
        for m in reversed(older[-limit:]):
            yield m


class Message:
    def __init__(self, channel: Channel, author: User, content: str, mentions=(), type=discord.MessageType.default):
        self.id, self.channel, self.author, self.content, self.type = next(_ids), channel, author, content, type
        self.guild = channel.guild
        self.mentions, self.role_mentions = list(mentions), []
        self.edits: list[dict] = []
        self.reactions: list[str] = []
        self.replies: list[dict] = []
        channel.messages.append(self)

    async def edit(self, content=None, **kw):
        self.edits.append({"content": content, **kw})
        self.content = content

    async def reply(self, content, **kw):
        self.replies.append({"content": content, **kw})

    async def create_thread(self, name):
        thread = Channel(discord.ChannelType.public_thread, id=self.id)  # Discord: the thread's id is the message's
        thread.name, thread.owner_id = name, BOT.id
        self.channel.threads.append(thread)
        return thread

    async def add_reaction(self, emoji):
        self.reactions.append(emoji)

    async def delete(self):
        self.channel.messages.remove(self)


class Emoji:
    def __init__(self, name):
        self.name = name


class Reaction:  # discord.RawReactionActionEvent
    def __init__(self, message: Message, user: User, emoji: str):
        self.message_id, self.user_id, self.emoji = message.id, user.id, Emoji(emoji)
        self.message_author_id, self.member, self.channel_id = message.author.id, None, message.channel.id


class Response:
    def __init__(self, interaction):
        self.interaction, self.sent = interaction, []

    def is_done(self):
        return bool(self.sent)

    async def send_message(self, content, **kw):
        self.sent.append({"content": content, **kw})
        if not kw.get("ephemeral"):
            self.interaction.message = Message(self.interaction.channel, BOT, content)


class Interaction:
    def __init__(self, channel: Channel, user: User):
        self.id, self.channel, self.user, self.guild = next(_ids), channel, user, channel.guild
        self.response, self.message = Response(self), None

    async def original_response(self):
        return self.message


def mention(channel: Channel, author: User, text: str) -> Message:
    return Message(channel, author, f"<@{BOT.id}> {text}", mentions=[BOT])


def all_outgoing(channel: Channel) -> list[dict]:
    """Every send, edit and notice the bot made in a channel and its threads."""
    out: list[dict] = []
    for ch in [channel, *channel.threads]:
        out += ch.sends
        for m in ch.messages:
            out += m.edits + m.replies
    return out


class StubEngine:
    """Streams a fixed reply in `pieces` parts through a real Request; records each prompt. With `hold`, the reply
    waits for the event before finishing (a long generation); `clock` advances 0.25 s per piece."""

    name, backend = "stub-model", "stub"
    loop: asyncio.AbstractEventLoop | None = None  # the test's event loop (`run` sets it): submit runs off it

    def __init__(self, text: str, pieces: int = 10, hold: asyncio.Event | None = None, clock=None,
                 submit_s: float = 0.0):
        self.text, self.pieces, self.hold, self.clock, self.submit_s = text, pieces, hold, clock, submit_s
        self.prompts: list[list[dict]] = []

    def submit(self, messages, params=None):
        time.sleep(self.submit_s)  # a real engine tokenizes here: seconds for a long prompt
        self.prompts.append(messages)
        req = Request(messages, params or SamplingParams(), [0] * 7, self.name, 64)
        loop = StubEngine.loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._feed(req)))
        return req

    async def _feed(self, req):
        while not req._wakers:  # the reply streams as the bot reads it (as the engine's does), not ahead of it
            await asyncio.sleep(0)
        step = -(-len(self.text) // self.pieces)
        for i in range(0, len(self.text), step):
            req._push(self.text[i:i + step])
            if self.clock is not None:
                self.clock.t += 0.25
            await asyncio.sleep(0)
        if self.hold is not None:
            await self.hold.wait()
        req._finish(self.text, "stop", self.pieces)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_bot(engine, tmp_path, **kw) -> DiscordBot:
    store = FeedbackStore(tmp_path / "feedback.db")
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 10), ignore_eos=kw.pop("ignore_eos", False))
    bot = DiscordBot(engine, store, params, cooldown_s=kw.pop("cooldown_s", 0.0), **kw)
    bot.user_id = BOT.id  # what on_ready sets once logged in
    return bot


def run(coro):
    async def main():
        StubEngine.loop = asyncio.get_running_loop()
        return await coro

    return asyncio.run(main())


