"""`rlhfchat discord`: message splitting, cooldown, thread history, the message / slash-command / reaction handlers
and the feedback rows, driven through DiscordBot's own handlers with fake discord objects (no network); the
missing-token and refused-token errors of the real command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time

import discord
import pytest

from rlhfchat.chat.discord_bot import (
    MESSAGE_LIMIT, Gate, Turn, add_arguments, build_history, hash_user, split_message, start,
    strip_mentions,
)
from rlhfchat.chat.engine import ChatEngine
from rlhfchat.chat.feedback import Conversation, Reply, Thumb
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.data.schema import read_jsonl
from rlhfchat.errors import RlhfchatError
from tests._discord_fakes import (
    ALICE, BOB, BOT, OTHER_BOT, Channel, Clock, Guild, Interaction, Message, Reaction, StubEngine, User,
    all_outgoing, make_bot, mention, run,
)


@pytest.fixture(autouse=True)
def _root_logger():
    """main() sets up logging (discord.utils.setup_logging): leave the root logger as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = ChatEngine(tiny_model_dir, max_batch=4, max_queue=4, threads=1)
    yield e
    e.close()


# ---------------------------------------------------------------------------------------------- pure pieces
def test_split_message_keeps_short_text_and_cuts_long_text_at_lines():
    assert split_message("hi there") == ["hi there"]
    assert split_message("") == [] and split_message("   \n ") == []
    text = "\n".join(f"line {i} " + "x" * 30 for i in range(200))
    chunks = split_message(text)
    assert len(chunks) > 3 and all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert "\n".join(chunks) == text  # cut only at line breaks: nothing lost, nothing added
    long_line = "word " * 1000  # one line longer than a message: cut at spaces
    parts = split_message(long_line.strip(), 100)
    assert all(len(p) <= 100 for p in parts) and " ".join(parts).split() == long_line.split()


def test_split_message_never_breaks_a_code_block():
    code = "\n".join(f"    total += value_{i}  # step {i}" for i in range(120))
    text = f"Here is the code:\n```python\ndef f():\n{code}\n```\nThat's all."
    chunks = split_message(text)
    assert len(chunks) >= 3 and all(len(c) <= MESSAGE_LIMIT for c in chunks)
    for c in chunks:
        assert c.count("```") % 2 == 0  # every message's blocks are closed
    assert all(c.startswith("```python\n") for c in chunks[1:])  # reopened with the language
    assert chunks[-1].endswith("```\nThat's all.")
    # taking the added closing and reopening fences out gives the text back
    inner = [c.removesuffix("\n```") if i < len(chunks) - 1 else c for i, c in enumerate(chunks)]
    inner = [c.removeprefix("```python\n") if i else c for i, c in enumerate(inner)]
    assert "\n".join(inner) == text
    # a block that opens on the last line that fits moves to the next message whole
    chunks = split_message("a" * 40 + "\n```\ncode line\n```", 50)
    assert chunks == ["a" * 40, "```\ncode line\n```"]
    # a block the text leaves open (a reply cut off, or still streaming) is closed
    assert split_message("```py\nx = 1") == ["```py\nx = 1\n```"]


def test_gate_cooldown_busy_and_one_reply_per_thread():
    clock = Clock()
    gate = Gate(cooldown_s=10, max_concurrent=2, clock=clock)
    assert gate.enter(ALICE.id, "t1") is None
    assert "again in 10 s" in gate.enter(ALICE.id, "t2")  # cooldown: per user
    assert "still writing" in gate.enter(BOB.id, "t1")  # one reply at a time in a thread
    assert gate.enter(BOB.id, "t2") is None
    assert "busy" in gate.enter(User(103).id, "t3")  # two replies already being written: no queue
    gate.leave("t1")
    assert gate.enter(User(103).id, "t3") is None and gate.active == 2
    clock.t += 9.6
    assert "again in 1 s" in gate.enter(ALICE.id, "t4")
    clock.t += 0.5
    gate.leave("t2")
    assert gate.enter(ALICE.id, "t4") is None
    with pytest.raises(RlhfchatError, match="max-concurrent"):
        Gate(1, 0)


def test_build_history_merges_a_split_reply_and_uses_the_stored_text():
    turns = [Turn("assistant", "part one", "r1"), Turn("assistant", "part two", "r1"),
             Turn("user", "thanks. "), Turn("user", "and more?"),
             Turn("assistant", "x", "r2"), Turn("user", "")]
    msgs = build_history("What is 2 + 3?", turns + [Turn("user", "last")], "SYS", {"r1": "part one\npart two!"})
    assert msgs == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "part one\npart two!"},  # the stored reply, once
        {"role": "user", "content": "thanks."},  # each message its own turn, for the engine's truncation
        {"role": "user", "content": "and more?"},
        {"role": "assistant", "content": "x"},  # no stored text: the message's own
        {"role": "user", "content": "last"},
    ]
    # without stored texts, the parts of one reply are joined
    assert build_history(None, [Turn("assistant", "a", "r"), Turn("assistant", "b", "r"), Turn("user", "q")],
                         "")[0] == {"role": "assistant", "content": "a\nb"}
    assert build_history(None, [Turn("user", "hi")], "")[0] == {"role": "user", "content": "hi"}


def test_mentions_and_user_hashes():
    assert strip_mentions(f"<@{BOT.id}> hello <@!{BOT.id}> <@999> <@&42>", BOT.id, (42,)) == "hello  <@999>"
    h = hash_user(ALICE.id, "salt")
    assert h == hash_user(ALICE.id, "salt") != hash_user(ALICE.id, "other") != hash_user(BOB.id, "salt")
    assert str(ALICE.id) not in h and h.startswith("discord:")


# ---------------------------------------------------------------------------------------------- handlers
def test_mention_opens_a_thread_and_the_thread_continues_with_its_history(engine, tmp_path):
    bot = make_bot(engine, tmp_path)
    channel = Channel()
    question = mention(channel, ALICE, "What is 2 + 3?")
    run(bot.on_message(question))

    [thread] = channel.threads
    assert thread.name == "What is 2 + 3?"
    first = [m for m in thread.messages if m.author is BOT]
    assert len(first) == 1 and first[0].reactions == ["👍", "👎"]
    with bot.store.Session() as s:
        [conv] = s.query(Conversation).all()
        [reply] = s.query(Reply).all()
    assert conv.source == "discord" and conv.client == hash_user(ALICE.id, bot.salt)
    assert reply.prompt == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2 + 3?"}]
    assert reply.model == engine.name and reply.sampling["max_new_tokens"] == 10
    assert [m.content for m in first] == (split_message(reply.content) or ["(no reply)"])

    # in the thread: a notice from the bot, another bot's message and a thread event are not part of the history
    Message(thread, BOT, "Slow down a little: you can ask again in 3 s.")
    Message(thread, OTHER_BOT, "I am another bot")
    Message(thread, ALICE, "", type=discord.MessageType.pins_add)
    follow_up = Message(thread, BOB, "And 3 + 4?")  # no mention needed in the bot's thread
    run(bot.on_message(follow_up))
    with bot.store.Session() as s:
        second = s.query(Reply).filter(Reply.id != reply.id).one()
    assert second.conversation_id == conv.id
    assert second.prompt == [*reply.prompt, {"role": "assistant", "content": reply.content},
                             {"role": "user", "content": "And 3 + 4?"}]

    # the same engine truncation as `serve`: a long history keeps the system prompt and the newest turns
    for i in range(30):
        Message(thread, BOB, f"Filler message number {i} " + "words " * 10)
    run(bot.on_message(Message(thread, ALICE, "Last question?")))
    with bot.store.Session() as s:
        last = s.query(Reply).order_by(Reply.created_at.desc()).first()
    assert last.prompt[0]["role"] == "system" and last.prompt[-1]["content"].endswith("Last question?")
    assert {"role": "user", "content": "What is 2 + 3?"} not in last.prompt  # the oldest turns were dropped
    assert last.prompt_tokens + 10 <= engine.context_window

    # messages that don't concern the bot are ignored
    run(bot.on_message(Message(channel, BOB, "just chatting")))
    everyone = Message(channel, BOB, "@everyone hello")
    everyone.mention_everyone = True
    run(bot.on_message(everyone))
    run(bot.on_message(Message(Channel(discord.ChannelType.public_thread), BOB, "someone else's thread")))
    run(bot.on_message(mention(channel, OTHER_BOT, "bots don't talk to bots")))
    assert len(channel.threads) == 1 and bot.store.counts()["replies"] == 3


def test_slash_ask_opens_a_thread_and_outside_a_channel_says_where_to_use_it(engine, tmp_path):
    bot = make_bot(engine, tmp_path)
    channel = Channel()
    inter = Interaction(channel, ALICE)
    run(bot.on_ask(inter, "  Write a function that doubles a number.  "))
    [shown] = inter.response.sent
    assert shown["content"] == "**alice** asks:\nWrite a function that doubles a number."
    assert shown["allowed_mentions"].everyone is False
    [thread] = channel.threads
    assert thread.id == inter.message.id and thread.name == "Write a function that doubles a number."
    with bot.store.Session() as s:
        [reply] = s.query(Reply).all()
    assert reply.prompt[-1] == {"role": "user", "content": "Write a function that doubles a number."}
    assert any(m.author is BOT for m in thread.messages)

    inside = Interaction(thread, ALICE)
    run(bot.on_ask(inside, "again"))
    assert inside.response.sent[0]["ephemeral"] is True and "text channel" in inside.response.sent[0]["content"]


def test_long_reply_streams_by_edits_is_split_and_nothing_can_ping(tmp_path):
    code = "\n".join(f"    print('line {i} of a long block')  # @everyone <@&42>" for i in range(60))
    text = "@everyone @here <@&42> look:\n```python\ndef f():\n" + code + "\n```\nDone."
    clock = Clock()
    stub = StubEngine(text, pieces=40, clock=clock)
    bot = make_bot(stub, tmp_path, clock=clock)
    channel = Channel()
    run(bot.on_message(mention(channel, ALICE, "print many lines")))

    [thread] = channel.threads
    parts = [m for m in thread.messages if m.author is BOT]
    assert len(parts) >= 2 and all(len(m.content) <= MESSAGE_LIMIT for m in parts)
    assert all(m.content.count("```") % 2 == 0 for m in parts)
    assert [m.content for m in parts] == split_message(text)  # the last edit shows the whole reply
    # edits: at most one per EDIT_INTERVAL_S of the (fake) clock: 40 pieces over 10 s
    edits = sum(len(m.edits) for m in parts)
    assert 3 <= edits <= 10 / bot.edit_interval_s + len(parts) + 1
    # every send and edit forbids pings (@everyone, @here, roles, users)
    outgoing = all_outgoing(channel)
    assert outgoing and all(o["allowed_mentions"] is not None for o in outgoing)
    for o in outgoing:
        am = o["allowed_mentions"]
        assert am.everyone is False and am.roles is False and am.users is False and am.replied_user is False

    # all parts are one reply: a reaction on any of them rates it; in the thread's history they are one turn
    rid = bot.links.replies_for([parts[0].id])[parts[0].id]
    assert set(bot.links.replies_for([m.id for m in parts]).values()) == {rid}
    clock.t += 60
    run(bot.on_message(Message(thread, ALICE, "Shorter please")))
    assert stub.prompts[-1][-2:] == [{"role": "assistant", "content": text},
                                     {"role": "user", "content": "Shorter please"}]


def test_cooldown_and_busy_are_said_not_queued(tmp_path):
    async def scenario():
        hold = asyncio.Event()
        clock = Clock()
        bot = make_bot(StubEngine("a slow reply", hold=hold), tmp_path, cooldown_s=30, max_concurrent=1, clock=clock)
        channel = Channel()
        first = asyncio.create_task(bot.on_message(mention(channel, ALICE, "first question")))
        for _ in range(20):
            await asyncio.sleep(0)
        busy = mention(channel, BOB, "second question")
        await bot.on_message(busy)  # returns at once: one reply is being written, the bound is 1
        assert "busy" in busy.replies[0]["content"] and busy.replies[0]["delete_after"] > 0
        assert busy.replies[0]["allowed_mentions"].everyone is False
        hold.set()
        await first
        again = mention(channel, ALICE, "third question")
        await bot.on_message(again)
        assert "again in 30 s" in again.replies[0]["content"]
        assert len(channel.threads) == 1 and bot.store.counts()["replies"] == 1
        clock.t += 31
        later = mention(channel, ALICE, "fourth question")
        await bot.on_message(later)
        assert not later.replies and len(channel.threads) == 2

    run(scenario())


def test_reactions_are_thumbs_in_the_store_and_export(engine, tmp_path):
    # Ten sampled tokens every time (no early EOS), so the two replies differ and export can pair them.
    bot = make_bot(engine, tmp_path, ignore_eos=True)
    channel = Channel()
    # the same question twice: two replies to the same prompt, which export can pair
    for user in (ALICE, BOB):
        run(bot.on_message(mention(channel, user, "What is 2 + 3?")))
    replies = [next(m for m in t.messages if m.author is BOT) for t in channel.threads]
    assert len(replies) == 2
    run(bot.on_reaction(Reaction(replies[0], ALICE, "👍🏽"), True))  # a skin tone is still a thumbs up
    run(bot.on_reaction(Reaction(replies[1], BOB, "👎"), True))
    run(bot.on_reaction(Reaction(replies[1], BOT, "👍"), True))  # the bot's own reactions don't count
    run(bot.on_reaction(Reaction(replies[1], ALICE, "🎉"), True))  # nor other emoji
    run(bot.on_reaction(Reaction(channel.messages[0], ALICE, "👍"), True))  # nor reactions on other messages
    with bot.store.Session() as s:
        thumbs = [(t.reply_id, t.value, t.user) for t in s.query(Thumb).order_by(Thumb.id)]
    ids = bot.links.replies_for([m.id for m in replies])
    assert thumbs == [(ids[replies[0].id], 1, hash_user(ALICE.id, bot.salt)),
                      (ids[replies[1].id], -1, hash_user(BOB.id, bot.salt))]
    # hashed, never the id itself (a check for the id's digits in the hash failed by chance 1 run in 70)
    assert all(t[2] not in (str(u.id), f"discord:{u.id}") and len(t[2]) == 40 for t in thumbs for u in (ALICE, BOB))

    out = tmp_path / "prefs.jsonl"
    assert bot.store.export(out) == 1
    [rec] = read_jsonl(out)
    assert rec["prompt"][-1] == {"role": "user", "content": "What is 2 + 3?"} and rec["source"] == "feedback"
    with bot.store.Session() as s:
        assert (rec["chosen"], rec["rejected"]) == (s.get(Reply, ids[replies[0].id]).content,
                                                    s.get(Reply, ids[replies[1].id]).content)

    # after a restart (a new bot on the same database) reactions still find their replies, under the same hashes;
    # taking a thumb back removes it, and then export has no pair
    bot.store.close()
    bot2 = make_bot(engine, tmp_path)
    assert bot2.salt == bot.salt
    run(bot2.on_reaction(Reaction(replies[1], BOB, "👍"), False))  # BOB's thumb is down: removing 👍 changes nothing
    assert bot2.store.counts()["thumbs"] == 2
    run(bot2.on_reaction(Reaction(replies[1], BOB, "👎"), False))
    assert bot2.store.counts()["thumbs"] == 3 and bot2.store.export(out) == 0
    bot2.store.close()


# ---------------------------------------------------------------------------------------------- the command
def _env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}


def test_missing_token_is_a_one_line_error_from_the_real_command(tiny_model_dir, tmp_path):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlhfchat.cli", "discord", str(tiny_model_dir),
                           "--db", str(tmp_path / "f.db")], capture_output=True, text=True,
                          env=_env_without_token(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DISCORD_TOKEN" in lines[0]
    assert not (tmp_path / "f.db").exists()  # failed before opening anything
    assert time.perf_counter() - t < 60


def test_refused_token_is_a_one_line_error_before_the_model_loads(tmp_path, monkeypatch, tiny_model_dir):
    async def refuse(self, token):
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(discord.Client, "login", refuse)
    loaded = []

    async def load():
        loaded.append(True)

    with pytest.raises(RlhfchatError, match="refused the token") as e:
        run(start(discord.Client(intents=discord.Intents.default()), "not-a-token", load))
    assert "\n" not in str(e.value) and "not-a-token" not in str(e.value) and not loaded

    # the real command's main: the same error, and the model is never loaded
    import rlhfchat.chat.engine as engine_module

    monkeypatch.setattr(engine_module, "load_engine", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setenv("DISCORD_TOKEN", "secret-token-value")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tiny_model_dir), "--db", str(tmp_path / "f.db"), "--log-level", "critical"])
    from rlhfchat.chat import discord_bot

    with pytest.raises(RlhfchatError, match="refused the token") as e:
        discord_bot.main(args)
    assert "secret-token-value" not in str(e.value)


def test_role_mention_one_off_answers_failures_and_operator_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhfchat.chat.discord_bot")
    bot = make_bot(StubEngine("Hello! <@&42>"), tmp_path)
    run(bot.on_ready(BOT, [Guild()]))
    run(bot.on_guild_join(Guild()))
    assert "logged in as rlhfchat" in caplog.text and "1 guilds: test guild (55)" in caplog.text
    assert "joined guild test guild (55)" in caplog.text

    # users often pick the bot's own role from the mention list: that counts as a mention
    bot.role_ids = (42,)
    channel = Channel()
    by_role = Message(channel, ALICE, "<@&42> hi")
    by_role.role_mentions = [type("Role", (), {"id": 42})()]
    run(bot.on_message(by_role))
    assert len(channel.threads) == 1
    assert "reply " in caplog.text and "tokens in" in caplog.text and "first token" in caplog.text

    # in someone else's thread (threads can't hold threads): answered in place, on its own, and rateable
    foreign = Channel(discord.ChannelType.public_thread)
    question = mention(foreign, BOB, "quick one")
    run(bot.on_message(question))
    [answer] = [m for m in foreign.messages if m.author is BOT]
    assert answer.content == "Hello! <@&42>" and answer.reactions == ["👍", "👎"]
    assert bot.links.thread(foreign.id) is None and answer.id in bot.links.replies_for([answer.id])
    run(bot.on_message(Message(foreign, BOB, "no mention, not the bot's thread")))
    assert len([m for m in foreign.messages if m.author is BOT]) == 1

    # a mention with no question gets a hint; a failure is logged and said, and frees its place
    empty = mention(channel, BOB, "")
    run(bot.on_message(empty))
    assert "Ask me something" in empty.replies[0]["content"]

    async def broken(name):
        raise RuntimeError("thread creation failed")

    failing = mention(channel, BOB, "will fail")
    failing.create_thread = broken
    run(bot.on_message(failing))
    assert "went wrong" in failing.replies[0]["content"] and "thread creation failed" in caplog.text
    assert bot.gate.active == 0


def test_client_wiring_without_network(tmp_path):
    """build_client: the intents, the /ask command and the events reach the bot's handlers."""
    from rlhfchat.chat.discord_bot import build_client

    bot = make_bot(StubEngine("ok"), tmp_path)
    client = build_client(bot)
    assert client.intents.message_content and client.intents.guild_reactions and client.intents.guild_messages
    assert client.allowed_mentions.everyone is False and client.allowed_mentions.roles is False
    ask = client.tree.get_command("ask")
    [param] = ask.parameters
    assert param.name == "question" and param.max_value == 1800 and param.description == "your question"
    assert ask.guild_only

    seen = []

    async def record(*a):
        seen.append(a)

    bot.on_message, bot.on_reaction = record, record
    run(client.on_message("m"))
    run(client.on_raw_reaction_add("p"))
    run(client.on_raw_reaction_remove("p"))
    assert seen == [("m",), ("p", True), ("p", False)]


def test_a_message_too_long_for_the_model_is_said_in_the_thread(engine, tmp_path):
    bot = make_bot(engine, tmp_path)
    channel = Channel()
    run(bot.on_message(mention(channel, ALICE, "seven " * 400)))  # far past the tiny model's 256 tokens
    [thread] = channel.threads
    [said] = thread.sends
    assert "too long" in said["content"] and said["allowed_mentions"].everyone is False
    assert bot.store.counts()["replies"] == 0 and bot.gate.active == 0


def test_the_engine_is_called_off_the_event_loop(tmp_path):
    """submit tokenizes (seconds for a long prompt): the bot runs it in a thread, so the event loop (heartbeats,
    other users' replies) keeps running meanwhile."""
    async def scenario():
        bot = make_bot(StubEngine("ok", submit_s=0.5), tmp_path)
        ticks, done = [], asyncio.Event()

        async def ticker():
            while not done.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await bot.on_message(mention(Channel(), ALICE, "a long question"))
        done.set()
        await task
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert len(ticks) >= 20 and max(gaps) < 0.25, max(gaps)  # never stalled for the 0.5 s submit
        assert bot.store.counts()["replies"] == 1

    run(scenario())
