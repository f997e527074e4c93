"""`rlhfchat discord MODEL_DIR [--db URL]`: the model as a Discord bot; 👍/👎 on its replies go to the feedback store.

    export DISCORD_TOKEN=...      # the bot's token from Discord's developer portal (docs/discord.md); never an argument
    rlhfchat discord runs/tiny/ppo --db runs/tiny/feedback.db

Mention the bot in a channel (or use its /ask command) and it opens a public thread and answers there; every later
message in that thread continues the conversation, with the thread's history as the prompt (the same engine, chat
template and context-window truncation as `rlhfchat serve`). A reply streams by editing its message at most once per
EDIT_INTERVAL_S and continues in a new message past Discord's 2000 characters, cut at line breaks and never inside a
code block (a block that has to be cut is closed and reopened with its language). 👍 or 👎 on any part of a reply is
a thumb in the same feedback store as the web page, under a salted hash of the Discord user id, so
`rlhfchat feedback export` includes it. Each user waits --cooldown seconds between requests, at most
--max-concurrent replies are written at once, and one at a time per thread: past that the bot says it is busy
instead of queueing. Nothing the bot sends can ping anyone: every send and edit carries AllowedMentions.none().

Which Discord message belongs to which stored reply, and which thread to which conversation, is kept in the feedback
store's own tables (feedback.py, which owns the whole schema: discord_messages, discord_threads, discord_settings),
so reactions and thread history survive a restart.

The file reads top to bottom (the pure pieces, split_message, Gate, build_history, hash_user, are in discord_text.py): the tables
(DiscordLinks), the handlers (DiscordBot, which tests drive with fake discord objects), and the thin discord.py
wiring (build_client, start, main). discord.py is imported only when the bot runs, so `rlhfchat --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from sqlalchemy import select

from rlhfchat.chat.discord_text import (  # noqa: F401  (re-exported: the handlers' tests import them from here)
    FENCE,
    MESSAGE_LIMIT,
    THUMBS,
    Gate,
    Turn,
    _emoji,
    build_history,
    hash_user,
    split_message,
    strip_mentions,
    thread_name,
)
from rlhfchat.chat.feedback import DiscordMessage, DiscordSetting, DiscordThread, Thumb
from rlhfchat.chat.request import add_sampling_arguments, sampling_params
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

log = logging.getLogger(__name__)

TOKEN_ENV = "DISCORD_TOKEN"
SALT_ENV = "RLHFCHAT_DISCORD_SALT"
"""Optional: the salt for hashing user ids; without it a random salt is made once and kept in the database."""
EDIT_INTERVAL_S = 1.0
"""Least time between two edits of a streaming reply: Discord allows about 5 edits per 5 s in a channel."""
HISTORY_LIMIT = 200
"""Thread messages read for the prompt; the engine then drops the oldest turns that do not fit the context."""
NOTICE_TTL_S = 20.0
"""Busy and cooldown notices delete themselves after this many seconds."""


# ------------------------------------------------------------------- links (the store owns the tables: feedback.py)
class DiscordLinks:
    """Discord ids <-> the feedback store's conversations and replies (feedback.py's discord_* tables)."""

    def __init__(self, store: Any):
        self.store = store

    def add_thread(self, thread_id: int, conversation_id: str, opening: str) -> None:
        with self.store.Session.begin() as s:
            s.add(DiscordThread(thread_id=str(thread_id), conversation_id=conversation_id, opening=opening))

    def thread(self, thread_id: int) -> tuple[str, str] | None:
        """(conversation id, opening question) of a thread the bot opened, else None."""
        with self.store.Session() as s:
            t = s.get(DiscordThread, str(thread_id))
            return None if t is None else (t.conversation_id, t.opening)

    def link(self, message_ids: list[int], reply_id: str, thread_id: int | None = None) -> None:
        with self.store.Session.begin() as s:
            for m in message_ids:
                s.merge(DiscordMessage(message_id=str(m), reply_id=reply_id,
                                       thread_id=None if thread_id is None else str(thread_id)))

    def replies_for(self, message_ids: list[int]) -> dict[int, str]:
        """Message id -> reply id, for those of the messages that show a stored reply."""
        if not message_ids:
            return {}
        with self.store.Session() as s:
            rows = s.scalars(select(DiscordMessage).where(DiscordMessage.message_id.in_([str(m) for m in message_ids])))
            return {int(r.message_id): r.reply_id for r in rows}

    def reply_texts(self, reply_ids: set[str]) -> dict[str, str]:
        texts = {}
        for rid in reply_ids:
            r = self.store.reply(rid)
            if r is not None:
                texts[rid] = r["content"]
        return texts

    def latest_thumb(self, reply_id: str, user: str) -> int | None:
        with self.store.Session() as s:
            t = s.scalars(select(Thumb).where(Thumb.reply_id == reply_id, Thumb.user == user)
                          .order_by(Thumb.id.desc()).limit(1)).first()
            return None if t is None else t.value

    def salt(self) -> str:
        """The salt for hashing user ids: $RLHFCHAT_DISCORD_SALT, else one made once and kept in the database (so a
        user's hash stays the same across restarts)."""
        if os.environ.get(SALT_ENV):
            return os.environ[SALT_ENV]
        with self.store.Session.begin() as s:
            row = s.get(DiscordSetting, "user_salt")
            if row is None:
                row = DiscordSetting(key="user_salt", value=secrets.token_hex(16))
                s.add(row)
            return row.value


# ---------------------------------------------------------------------------------------------- handlers
def _discord() -> Any:
    try:
        import discord
    except ImportError as e:
        raise RlhfchatError(f"`rlhfchat discord` needs discord.py ({e}); install with: pip install 'rlhfchat[discord]'"
                            ) from None
    return discord


class StreamingReply:
    """One reply shown in a channel while it is written: the first message at once ("…"), then edits at most every
    `interval_s`, new messages as the text passes the message limit, and a last edit with the whole text."""

    def __init__(self, channel: Any, allowed_mentions: Any, interval_s: float = EDIT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.channel, self.allowed_mentions, self.interval_s, self.clock = channel, allowed_mentions, interval_s, clock
        self.messages: list[Any] = []
        self.shown: list[str] = []
        self.text = ""
        self._last = -float("inf")

    async def add(self, piece: str) -> None:
        self.text += piece
        if self.clock() - self._last >= self.interval_s:
            await self.show(self.text)

    async def show(self, text: str) -> None:
        chunks = split_message(text) or ["…"]
        for i, chunk in enumerate(chunks):
            if i == len(self.messages):
                self.messages.append(await self.channel.send(chunk, allowed_mentions=self.allowed_mentions))
                self.shown.append(chunk)
            elif self.shown[i] != chunk:
                await self.messages[i].edit(content=chunk, allowed_mentions=self.allowed_mentions)
                self.shown[i] = chunk
        while len(self.messages) > len(chunks):  # a closed code block let the text fit in fewer messages
            await self.messages.pop().delete()
            self.shown.pop()
        self._last = self.clock()

    async def finish(self, text: str) -> None:
        await self.show(text if text.strip() else "(no reply)")


class DiscordBot:
    """The bot's behaviour, apart from discord.py's client: build_client routes the client's events here, and tests
    call these methods with fake messages, threads, interactions and reaction payloads."""

    def __init__(self, engine: Any, store: Any, params: Any = None, *, system: str = SYSTEM_PROMPT,
                 cooldown_s: float = 5.0, max_concurrent: int = 4, edit_interval_s: float = EDIT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        from rlhfchat.chat.request import SamplingParams

        self.discord = _discord()
        self.engine, self.store = engine, store
        self.params = params or SamplingParams()
        self.system = system
        self.gate = Gate(cooldown_s, max_concurrent, clock)
        self.edit_interval_s, self.clock = edit_interval_s, clock
        self.links = DiscordLinks(store)
        self.salt = self.links.salt()
        self.user_id: int | None = None  # the bot's own user id, known once logged in
        self.role_ids: tuple[int, ...] = ()  # the bot's own roles, which users may mention instead of the bot
        self.none = self.discord.AllowedMentions.none()
        d = self.discord
        self._threads = (d.ChannelType.public_thread, d.ChannelType.private_thread, d.ChannelType.news_thread)
        self._thread_parents = (d.ChannelType.text, d.ChannelType.news)
        self._chat_types = (d.MessageType.default, d.MessageType.reply)

    # ------------------------------------------------------------------ events
    async def on_ready(self, user: Any, guilds: list[Any]) -> None:
        self.user_id = user.id
        names = ", ".join(f"{g.name} ({g.id})" for g in guilds) or "none yet: invite the bot with its OAuth2 URL"
        log.info("logged in as %s (id %s); model %s; in %d guilds: %s", user, user.id,
                 getattr(self.engine, "name", "?"), len(guilds), names)

    async def on_guild_join(self, guild: Any) -> None:
        log.info("joined guild %s (%s)", guild.name, guild.id)

    async def on_guild_remove(self, guild: Any) -> None:
        log.info("removed from guild %s (%s)", guild.name, guild.id)

    async def on_message(self, message: Any) -> None:
        """A mention in a channel opens a thread; any message in a thread the bot opened continues it; a mention
        anywhere else (someone else's thread, a channel without threads) gets a one-off answer in place."""
        if self.user_id is None or message.author.bot or message.guild is None:
            return
        if message.type not in self._chat_types:
            return
        channel = message.channel
        mentioned = any(u.id == self.user_id for u in message.mentions) or any(
            r.id in self.role_ids for r in getattr(message, "role_mentions", []))
        ours = channel.type in self._threads and (mentioned or getattr(channel, "owner_id", None) == self.user_id)
        known = await asyncio.to_thread(self.links.thread, channel.id) if ours else None  # a thread the bot opened
        if known is None and not mentioned:
            return
        text = strip_mentions(message.content, self.user_id, self.role_ids)
        if not text:
            if mentioned:
                await self._notice(message, "Ask me something: mention me with your question, or use /ask.")
            return
        try:
            if known is not None:
                await self._continue(message, channel, known)
            elif channel.type in self._thread_parents:
                await self._open(message.author, text, message, message.create_thread)
            else:
                await self._one_off(message, text)
        except Exception:
            log.exception("message %s in channel %s failed", message.id, channel.id)
            await self._notice(message, "Something went wrong on my side; the operator can see it in the log.")

    async def on_ask(self, interaction: Any, question: str) -> None:
        """/ask QUESTION: the question as the bot's message in the channel, a thread from it, the answer there."""
        question = question.strip()
        channel = interaction.channel
        if interaction.guild is None or channel is None or channel.type not in self._thread_parents:
            await self._notice(interaction, "Use /ask in a server text channel; in a thread I opened, just write.")
            return
        if not question:
            await self._notice(interaction, "Ask me something: /ask followed by your question.")
            return

        async def create_thread(name: str) -> Any:
            shown = f"**{interaction.user.display_name}** asks:\n{question}"
            await interaction.response.send_message(split_message(shown)[0], allowed_mentions=self.none)
            starter = await interaction.original_response()
            return await starter.create_thread(name=name)

        try:
            await self._open(interaction.user, question, interaction, create_thread)
        except Exception:
            log.exception("/ask in channel %s failed", channel.id)
            await self._notice(interaction, "Something went wrong on my side; the operator can see it in the log.")

    async def on_reaction(self, payload: Any, added: bool) -> None:
        """👍/👎 added to (or taken off) any message of a stored reply: a thumb in the store."""
        if self.user_id is None or payload.user_id == self.user_id:
            return
        if getattr(payload, "message_author_id", None) not in (None, self.user_id):
            return
        up = THUMBS.get(_emoji(getattr(payload.emoji, "name", None) or str(payload.emoji)))
        member = getattr(payload, "member", None)
        if up is None or (member is not None and member.bot):
            return
        reply_id = (await asyncio.to_thread(self.links.replies_for, [payload.message_id])).get(payload.message_id)
        if reply_id is None:
            return
        user = hash_user(payload.user_id, self.salt)
        if added:
            await asyncio.to_thread(self.store.thumb, reply_id, up, user)
        elif await asyncio.to_thread(self.links.latest_thumb, reply_id, user) == (1 if up else -1):
            await asyncio.to_thread(self.store.thumb, reply_id, None, user)  # taken back
        else:
            return
        log.info("thumb %s on reply %s by %s", ("up" if up else "down") if added else "taken back", reply_id, user)

    # ------------------------------------------------------------------ conversations
    async def _open(self, author: Any, question: str, origin: Any, create_thread: Callable[[str], Awaitable[Any]]):
        """A new conversation in a new thread."""
        key = ("new", getattr(origin, "id", id(origin)))
        if not await self._enter(author, key, origin):
            return
        try:
            user = hash_user(author.id, self.salt)
            thread = await create_thread(thread_name(question))
            conv = await asyncio.to_thread(self.store.new_conversation, "discord", user)
            await asyncio.to_thread(self.links.add_thread, thread.id, conv, question)
            log.info("thread %s opened by %s", thread.id, user)
            await self._reply(thread, build_history(question, [], self.system), conv, user, thread.id)
        finally:
            self.gate.leave(key)

    async def _continue(self, message: Any, thread: Any, known: tuple[str, str]) -> None:
        """The next reply in a thread the bot opened, from the thread's history."""
        if not await self._enter(message.author, thread.id, message):
            return
        try:
            conv, opening = known
            before = [m async for m in thread.history(limit=HISTORY_LIMIT, before=message)]
            history = [*reversed(before), message]  # oldest first
            mine = [m.id for m in history if m.author.id == self.user_id]
            reply_of = await asyncio.to_thread(self.links.replies_for, mine)
            turns = []
            for m in history:
                if m.type not in self._chat_types or (m.author.bot and m.author.id != self.user_id):
                    continue  # thread events, other bots
                if m.author.id == self.user_id:
                    if m.id in reply_of:  # the bot's notices are not replies: left out
                        turns.append(Turn("assistant", m.content, reply_of[m.id]))
                else:
                    turns.append(Turn("user", strip_mentions(m.content, self.user_id, self.role_ids)))
            texts = await asyncio.to_thread(self.links.reply_texts, set(reply_of.values()))
            messages = build_history(opening, turns, self.system, texts)
            user = hash_user(message.author.id, self.salt)
            await self._reply(thread, messages, conv, user, thread.id)
        finally:
            self.gate.leave(thread.id)

    async def _one_off(self, message: Any, text: str) -> None:
        """A mention where no thread can be opened: answered in place, as a conversation of its own."""
        key = ("one-off", message.id)
        if not await self._enter(message.author, key, message):
            return
        try:
            user = hash_user(message.author.id, self.salt)
            conv = await asyncio.to_thread(self.store.new_conversation, "discord", user)
            await self._reply(message.channel, build_history(text, [], self.system), conv, user, None)
        finally:
            self.gate.leave(key)

    async def _enter(self, author: Any, key: Any, origin: Any) -> bool:
        refusal = self.gate.enter(author.id, key)
        if refusal is not None:
            log.info("request from %s refused: %s", hash_user(author.id, self.salt), refusal)
            await self._notice(origin, refusal)
        return refusal is None

    async def _reply(self, channel: Any, messages: list[dict[str, str]], conv: str, user: str,
                     thread_id: int | None) -> None:
        """Generate, stream into `channel`, store the reply, link its messages to it, offer 👍/👎."""
        from rlhfchat.chat.request import EngineBusy, PromptTooLong

        start = time.perf_counter()
        try:
            req = await asyncio.to_thread(self.engine.submit, messages, self.params)  # tokenizes: off the loop
        except RlhfchatError as e:  # busy, a prompt too long for the model, a closed engine
            log.warning("request in %s not started: %s", getattr(channel, "id", "?"), e)
            say = ("I'm busy with other replies right now. Please try again in a minute." if isinstance(e, EngineBusy)
                   else "That message is too long for me; please shorten it." if isinstance(e, PromptTooLong)
                   else "I can't answer right now; the operator can see why in the log.")
            await channel.send(say, allowed_mentions=self.none)
            return
        out = StreamingReply(channel, self.none, self.edit_interval_s, self.clock)
        try:
            await out.show("")
            async for piece in req:
                await out.add(piece)
            completion = req.result()
        except RlhfchatError as e:
            log.error("generation failed in %s: %s", getattr(channel, "id", "?"), e)
            await out.finish(out.text + "\n\n⚠️ The reply failed part-way; please try again.")
            return
        finally:
            req.cancel()  # leaving early (Discord error, shutdown) stops the generation; a no-op once finished
        await out.finish(completion.text)
        reply_id = uuid.uuid4().hex
        await asyncio.to_thread(self.store.add_reply, conv, completion, reply_id=reply_id)
        await asyncio.to_thread(self.links.link, [m.id for m in out.messages], reply_id, thread_id)
        total = time.perf_counter() - start
        dropped = len(messages) - len(completion.messages)
        log.info("reply %s in %s for %s: %d prompt tokens%s, %d tokens in %.2fs (first token %.2fs, %.1f tok/s), "
                 "%d message(s), finish %s", reply_id, getattr(channel, "id", "?"), user, completion.prompt_tokens,
                 f" ({dropped} oldest messages dropped to fit)" if dropped else "", completion.completion_tokens,
                 total, completion.ttft_s or 0.0, completion.completion_tokens / max(completion.elapsed_s, 1e-9),
                 len(out.messages), completion.finish_reason)
        try:
            for emoji in THUMBS:
                await out.messages[-1].add_reaction(emoji)
        except self.discord.HTTPException as e:  # no Add Reactions permission: users can still add them
            log.warning("cannot add 👍/👎 to reply %s: %s", reply_id, e)

    async def _notice(self, origin: Any, text: str) -> None:
        """A short answer to a message (deleted after NOTICE_TTL_S) or an interaction (only the user sees it)."""
        try:
            if hasattr(origin, "response"):  # an interaction
                if origin.response.is_done():
                    await origin.followup.send(text, ephemeral=True, allowed_mentions=self.none)
                else:
                    await origin.response.send_message(text, ephemeral=True, allowed_mentions=self.none)
            else:
                await origin.reply(text, mention_author=False, allowed_mentions=self.none, delete_after=NOTICE_TTL_S)
        except self.discord.HTTPException as e:
            log.warning("cannot send a notice: %s", e)


# ---------------------------------------------------------------------------------------------- discord.py wiring
def build_client(bot: DiscordBot) -> Any:
    """A discord.py client whose events and /ask command call the bot's handlers."""
    discord = _discord()
    from discord import app_commands

    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # no voice: no warnings about its packages
    intents = discord.Intents.default()
    intents.message_content = True  # privileged: enabled on the Bot page of the developer portal
    client = discord.Client(intents=intents, allowed_mentions=discord.AllowedMentions.none())
    client.tree = tree = app_commands.CommandTree(client)  # `.tree`, as on discord.ext.commands.Bot

    async def ask(interaction: Any, question: str) -> None:
        await bot.on_ask(interaction, question)

    # real types, not this module's postponed (string) annotations: discord.py reads them to declare the command
    ask.__annotations__ = {"interaction": discord.Interaction, "question": app_commands.Range[str, 1, 1800],
                           "return": None}
    tree.command(name="ask", description="Ask the model something; the answer comes in a new thread")(
        app_commands.guild_only(app_commands.describe(question="your question")(ask)))

    async def setup_hook() -> None:  # after login, before the gateway: register /ask (global; idempotent)
        try:
            await tree.sync()
            log.info("slash command /ask registered")
        except discord.HTTPException as e:
            log.warning("cannot register /ask (%s); mentions still work", e)

    client.setup_hook = setup_hook

    @client.event
    async def on_ready() -> None:
        me = client.user
        bot.role_ids = tuple(r.id for g in client.guilds for r in g.roles
                             if r.tags is not None and r.tags.bot_id == me.id)
        await bot.on_ready(me, list(client.guilds))

    @client.event
    async def on_message(message: discord.Message) -> None:
        await bot.on_message(message)

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        await bot.on_reaction(payload, True)

    @client.event
    async def on_raw_reaction_remove(payload: discord.RawReactionActionEvent) -> None:
        await bot.on_reaction(payload, False)

    @client.event
    async def on_guild_join(guild: discord.Guild) -> None:
        await bot.on_guild_join(guild)

    @client.event
    async def on_guild_remove(guild: discord.Guild) -> None:
        await bot.on_guild_remove(guild)

    return client


async def start(client: Any, token: str, before_connect: Callable[[], Awaitable[None]] | None = None) -> None:
    """Log in (a refused token is a one-line RlhfchatError, before anything slow), run `before_connect` (loading
    the model), then stay connected until the process is stopped."""
    discord = _discord()
    import aiohttp

    async with client:
        try:
            await client.login(token)
        except discord.LoginFailure:
            raise RlhfchatError(f"${TOKEN_ENV}: Discord refused the token; copy a new one from the Bot page of the "
                                "developer portal (Reset Token)") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RlhfchatError(f"cannot reach Discord ({type(e).__name__}: {e})") from None
        if before_connect is not None:
            await before_connect()
        try:
            await client.connect(reconnect=True)
        except discord.PrivilegedIntentsRequired:
            raise RlhfchatError("Discord refused the Message Content intent: enable it under Privileged Gateway "
                                "Intents on the Bot page of the developer portal") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="a Hugging Face causal-LM folder (or LoRA adapter folder), or a hub id")
    parser.add_argument("--db", default=None,
                        help="feedback database: a SQLAlchemy URL (postgresql://...) or a SQLite file path "
                             "(default: feedback.db in the model's run folder, else in the current folder)")
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt (default: the Vicuna one)")
    add_sampling_arguments(parser)
    parser.add_argument("--cooldown", type=float, default=5.0,
                        help="seconds each user waits between two requests (default 5)")
    parser.add_argument("--max-concurrent", type=int, default=4,
                        help="replies written at once; past that the bot says it is busy (default 4)")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                        help="generation backend (auto: vLLM when installed and a GPU is present, else HF)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace) -> None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise RlhfchatError(f"${TOKEN_ENV} is not set: create a bot in Discord's developer portal, copy its token "
                            f"and `export {TOKEN_ENV}=...` (see docs/discord.md)")
    from rlhfchat.models import resolve_model

    source = resolve_model(args.model_dir)  # a folder, or a hub id (its cached copy offline): before logging in
    discord = _discord()
    from rlhfchat.chat.feedback import FeedbackStore, default_db

    params = sampling_params(args)
    gate = Gate(args.cooldown, args.max_concurrent)  # checks the numbers before anything is opened
    discord.utils.setup_logging(level=getattr(logging, args.log_level.upper()))
    store = FeedbackStore(args.db or default_db([args.model_dir]))
    bot = DiscordBot(None, store, params, system=args.system, cooldown_s=gate.cooldown_s,
                     max_concurrent=gate.max_concurrent)
    client = build_client(bot)

    async def load() -> None:
        from rlhfchat.chat.engine import load_engine, server_threads

        log.info("token accepted; loading %s (feedback: %s)", args.model_dir, store.safe_url())
        t = time.perf_counter()
        bot.engine = await asyncio.to_thread(
            load_engine, source, name=Path(args.model_dir).name, backend=args.backend, max_batch=args.max_concurrent,
            max_queue=args.max_concurrent, threads=server_threads())
        log.info("model %s loaded (%s) in %.1fs; connecting to Discord", bot.engine.name, bot.engine.backend,
                 time.perf_counter() - t)

    try:
        asyncio.run(start(client, token, load))
    finally:
        if bot.engine is not None:
            bot.engine.close()
        store.close()
