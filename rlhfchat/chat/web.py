"""The web chat page (Gradio), mounted at / by `rlhfchat serve`.

Chat tab: streaming replies with stop, regenerate and clear; system prompt and sampling settings; markdown and code
blocks rendered; the model's name shown; thumbs up/down on every reply (stored with the reply).
Arena tab (two or more models): one prompt goes to two models picked at random and shown as "Model A" and
"Model B"; the user votes A, B, tie or both bad, and only then are the names revealed.

Every message is shown as text: outside code spans and blocks, "<" and "&" are escaped before markdown rendering,
so `<script>` or `<img onerror=...>` typed by a user (or produced by a model) is displayed literally and never runs;
Gradio's own HTML sanitizer stays on behind that. The conversation the model sees is kept apart from what is
displayed, so escaping never changes a prompt.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from typing import Any

import gradio as gr

from rlhfchat.chat.engine import SamplingParams
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`)", re.S)
VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
CSS = """
#chatbot, #arena-a, #arena-b { min-height: 420px; }
.model-name { font-size: 0.95em; opacity: 0.85; }
"""


def as_text(text: str) -> str:
    """Markdown that shows `text` literally wherever it would be HTML: escape & and < outside code
    (markdown renders code spans and blocks as text already)."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;")
    return "".join(parts)


def display(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": as_text(m["content"])} for m in messages]


def _params(temperature: float, top_p: float, top_k: float, max_new_tokens: float, repetition_penalty: float,
            seed: float) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                          seed=None if seed is None or int(seed) < 0 else int(seed))


async def _record(store: Any, state: dict[str, Any], source: str, completion: Any, reply_id: str) -> None:
    """Store a finished (or stopped) reply under the state's conversation (created on the first reply)."""
    if store is None or completion is None:
        return
    if state.get("conv") is None:
        state["conv"] = await asyncio.to_thread(store.new_conversation, source)
    await asyncio.to_thread(store.add_reply, state["conv"], completion, reply_id=reply_id)


def build_ui(engines: dict[str, Any], store: Any = None, *, system_prompt: str = SYSTEM_PROMPT) -> gr.Blocks:
    names = list(engines)
    with gr.Blocks(title="rlhfchat") as demo:
        gr.Markdown("## rlhfchat")
        with gr.Tab("Chat", id="chat"):
            _chat_tab(engines, store, names, system_prompt)
        if len(names) >= 2:
            with gr.Tab("Arena", id="arena"):
                _arena_tab(engines, store, names, system_prompt)
    demo.queue(default_concurrency_limit=None)  # the engines batch and queue requests themselves
    return demo


def _sampling_controls(system_prompt: str) -> list[Any]:
    with gr.Accordion("System prompt and sampling", open=False):
        system = gr.Textbox(system_prompt, label="System prompt", lines=2, elem_id="system-prompt")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top k (0 = off)")
        with gr.Row():
            max_new = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
            rep = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed")
    return [system, temperature, top_p, top_k, max_new, rep, seed]


def _chat_tab(engines: dict[str, Any], store: Any, names: list[str], system_prompt: str) -> None:
    if len(names) == 1:
        gr.Markdown(f"Model: **{as_text(names[0])}**", elem_id="model-name", elem_classes="model-name")
        model = gr.State(names[0])
    else:
        model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model-name")
    chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=480, sanitize_html=True, render_markdown=True,
                         allow_tags=False, feedback_options=("Like", "Dislike"), buttons=["copy"],
                         placeholder="Ask anything. Replies stream as they are written.")
    with gr.Row():
        box = gr.Textbox(placeholder="Type a message (Enter sends, Shift+Enter for a new line)", lines=1, max_lines=12,
                         show_label=False, scale=8, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="regen-btn")
        clear = gr.Button("Clear", elem_id="clear-btn")
    controls = _sampling_controls(system_prompt)
    state = gr.State({"conv": None, "messages": [], "reply_ids": []})

    async def reply(state: dict[str, Any], model_name: str, system: str, *sampling: Any) -> Any:
        """Stream the assistant's reply to the conversation in `state` (which ends with a user message)."""
        state = {**state, "messages": list(state["messages"]), "reply_ids": list(state["reply_ids"])}
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + state["messages"]
        try:
            req = await asyncio.to_thread(engines[model_name].submit, prompt, _params(*sampling))  # tokenizes
        except RlhfchatError as e:  # busy, or the message alone is longer than the model takes
            gr.Warning(str(e))
            yield display(state["messages"]), state
            return
        if store is not None and state["conv"] is None:  # before streaming: Stop may end this handler early
            state["conv"] = await asyncio.to_thread(store.new_conversation, "web")
        reply_id = uuid.uuid4().hex
        state["messages"].append({"role": "assistant", "content": ""})
        state["reply_ids"] += [None] * (len(state["messages"]) - 1 - len(state["reply_ids"])) + [reply_id]
        try:
            async for piece in req:
                state["messages"][-1] = {"role": "assistant", "content": state["messages"][-1]["content"] + piece}
                yield display(state["messages"]), state
        except RlhfchatError as e:
            gr.Warning(str(e))
        finally:  # also when Stop cancels this handler: the reply so far is kept and stored
            req.cancel()
            try:
                await _record(store, state, "web", await asyncio.to_thread(req.result, 10), reply_id)
            except (RlhfchatError, TimeoutError):  # failed, or stopped before it started: nothing to store
                pass
        yield display(state["messages"]), state

    async def send_message(text: str, state: dict[str, Any], model_name: str, *rest: Any) -> Any:
        if not text.strip():
            yield gr.update(), display(state["messages"]), state
            return
        state = {**state, "messages": [*state["messages"], {"role": "user", "content": text}]}
        yield "", display(state["messages"]), state
        async for shown, new_state in reply(state, model_name, *rest):
            yield "", shown, new_state

    async def regenerate(state: dict[str, Any], model_name: str, *rest: Any) -> Any:
        messages = list(state["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            yield display(messages), state
            return
        state = {**state, "messages": messages, "reply_ids": state["reply_ids"][:len(messages)]}
        async for out in reply(state, model_name, *rest):
            yield out

    def on_like(state: dict[str, Any], data: gr.LikeData) -> None:
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        ids = state["reply_ids"]
        if store is None or not isinstance(index, int) or index >= len(ids) or ids[index] is None:
            return
        up = True if data.liked is True else False if data.liked is False else None
        try:
            store.thumb(ids[index], up)
        except RlhfchatError:  # the reply was not stored (e.g. still streaming)
            gr.Warning("Wait for the reply to finish before rating it.")

    inputs = [box, state, model, *controls]
    outputs = [box, chatbot, state]
    events = [box.submit(send_message, inputs, outputs), send.click(send_message, inputs, outputs),
              regen.click(regenerate, [state, model, *controls], [chatbot, state])]
    stop.click(None, None, None, cancels=events)

    def reset() -> Any:
        return [], {"conv": None, "messages": [], "reply_ids": []}

    clear.click(reset, None, [chatbot, state], cancels=events)
    chatbot.clear(reset, None, [chatbot, state], cancels=events)  # the chatbot's own trash button
    chatbot.like(on_like, [state], None)


def _arena_tab(engines: dict[str, Any], store: Any, names: list[str], system_prompt: str) -> None:
    gr.Markdown("Two anonymous models answer the same prompt. Vote for the better answer; "
                "the models' names are shown after your vote.")
    with gr.Row():
        bots = [gr.Chatbot(elem_id=f"arena-{side}", label=f"Model {side.upper()}", height=420, sanitize_html=True,
                           render_markdown=True, allow_tags=False, feedback_options=("Like", "Dislike"),
                           buttons=["copy"]) for side in ("a", "b")]
    with gr.Row():
        box = gr.Textbox(placeholder="Type a prompt for both models (Enter sends, Shift+Enter for a new line)",
                         lines=1, max_lines=12, show_label=False, scale=8, elem_id="arena-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="arena-send")
    with gr.Row():
        vote_btns = {w: gr.Button(label, interactive=False, elem_id=f"vote-{w.replace('_', '-')}")
                     for w, label in VOTES.items()}
    reveal = gr.Markdown("", elem_id="arena-reveal")
    new_round = gr.Button("New round", elem_id="new-round")
    controls = _sampling_controls(system_prompt)

    def fresh() -> dict[str, Any]:
        return {"models": random.sample(names, 2), "conv": None, "messages": [[], []], "reply_ids": [[], []],
                "voted": False}

    state = gr.State(fresh)
    votes_off = [gr.update(interactive=False)] * len(vote_btns)

    async def send_prompt(text: str, state: dict[str, Any], system: str, *sampling: Any) -> Any:
        if not text.strip() or state["voted"]:
            yield (gr.update(), *(display(m) for m in state["messages"]), state, *votes_off)
            return
        state = {**state, "messages": [[*m, {"role": "user", "content": text}] for m in state["messages"]],
                 "reply_ids": [list(r) for r in state["reply_ids"]]}
        sys_msgs = [{"role": "system", "content": system}] if system.strip() else []
        reqs: list[Any] = []
        try:
            params = _params(*sampling)  # a seed out of range is a warning, as a busy model is
            for i in (0, 1):  # off the event loop: submit tokenizes
                reqs.append(await asyncio.to_thread(engines[state["models"][i]].submit,
                                                    sys_msgs + state["messages"][i], params))
        except RlhfchatError as e:
            for r in reqs:  # the other model's reply, if it had started
                r.cancel()
            gr.Warning(str(e))
            yield (gr.update(), *(display(m[:-1]) for m in state["messages"]), state, *votes_off)
            return
        reply_ids = [uuid.uuid4().hex, uuid.uuid4().hex]
        texts = ["", ""]
        for i in (0, 1):
            state["messages"][i].append({"role": "assistant", "content": ""})
            state["reply_ids"][i] += [None] * (len(state["messages"][i]) - 1 - len(state["reply_ids"][i]))
            state["reply_ids"][i].append(reply_ids[i])
        changed = asyncio.Event()

        async def pump(i: int) -> None:
            async for piece in reqs[i]:
                texts[i] += piece
                changed.set()

        tasks = [asyncio.create_task(pump(i)) for i in (0, 1)]

        def snapshot() -> Any:
            for i in (0, 1):
                state["messages"][i][-1] = {"role": "assistant", "content": texts[i]}
            return ("", *(display(m) for m in state["messages"]), state, *votes_off)

        yield snapshot()
        try:
            while not all(t.done() for t in tasks):
                waiter = asyncio.ensure_future(changed.wait())
                await asyncio.wait([waiter, *(t for t in tasks if not t.done())], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                changed.clear()
                yield snapshot()
        finally:
            for t in tasks:
                t.cancel()
            for r in reqs:
                r.cancel()
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:  # a failed reply cannot be voted on
            gr.Warning(str(errors[0]))
            yield ("", *(display(m) for m in state["messages"]), state, *votes_off)
            return
        for i in (0, 1):
            await _record(store, state, "arena", await asyncio.to_thread(reqs[i].result, 5), reply_ids[i])
        state["last"] = reply_ids
        votes_on = [gr.update(interactive=True)] * len(vote_btns)
        yield ("", *(display(m) for m in state["messages"]), state, *votes_on)

    def vote(winner: str) -> Any:
        def handler(state: dict[str, Any]) -> Any:
            if state.get("voted") or not state.get("last"):
                return (state, gr.update(), *([gr.update()] * len(vote_btns)))
            if store is not None:
                store.arena_vote(state["last"][0], state["last"][1], winner)
            a, b = (as_text(n) for n in state["models"])
            text = (f"**You voted: {VOTES[winner]}.** Model A was **{a}**, model B was **{b}**. "
                    "Press *New round* to compare two models again.")
            return ({**state, "voted": True}, text, *votes_off)
        return handler

    def start_new() -> Any:
        return (fresh(), "", [], [], "", *votes_off)

    outputs = [box, *bots, state, *vote_btns.values()]
    inputs = [box, state, *controls]
    events = [box.submit(send_prompt, inputs, outputs), send.click(send_prompt, inputs, outputs)]
    for w, btn in vote_btns.items():
        btn.click(vote(w), [state], [state, reveal, *vote_btns.values()])
    for trigger in (new_round.click, *(bot.clear for bot in bots)):  # clearing either side starts over
        trigger(start_new, None, [state, reveal, *bots, box, *vote_btns.values()], cancels=events)

    def on_like(side: int) -> Any:
        def handler(state: dict[str, Any], data: gr.LikeData) -> None:
            index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
            ids = state["reply_ids"][side]
            if store is not None and isinstance(index, int) and index < len(ids) and ids[index]:
                try:
                    store.thumb(ids[index], True if data.liked is True else False if data.liked is False else None)
                except RlhfchatError:
                    gr.Warning("Wait for the reply to finish before rating it.")
        return handler

    for side, bot in enumerate(bots):
        bot.like(on_like(side), [state], None)
