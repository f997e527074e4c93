"""The web chat page (Gradio), mounted at / by `rlhfchat serve`.

Chat tab: streaming replies with stop, regenerate and clear; system prompt and sampling settings (the max-tokens
slider bounded by the chosen model's context window); markdown and code blocks rendered; every reply labelled with
the model that wrote it, also after switching models; a note when the oldest turns had to be left out to fit the
context; thumbs up/down on every reply (stored with the reply).
Arena tab (two or more models, web_arena.py): one prompt goes to two models picked at random and shown as "Model A"
and "Model B"; the user votes A, B, tie or both bad, and only then are the names revealed; Stop and Regenerate; Send
after a vote starts a new round. Leaderboard tab: the arena's Bradley-Terry ratings with bootstrap intervals.
The header links to the API's own docs (/v1/docs) and shows the operator's notice (`serve --notice`), if any.

Every message is shown as text: outside code spans and blocks, "<" and "&" are escaped before markdown rendering,
so `<script>` or `<img onerror=...>` typed by a user (or produced by a model) is displayed literally and never runs;
Gradio's own HTML sanitizer stays on behind that. The conversation the model sees is kept apart from what is
displayed, so escaping (and the model labels) never change a prompt.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import gradio as gr

from rlhfchat.chat.web_arena import arena_tab, leaderboard_tab
from rlhfchat.chat.web_parts import (
    as_text, display, dropped_note, prompt_of, rate_reply, record_reply, sampling_controls, sampling_from,
)
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

CSS = """
#chatbot, #arena-a, #arena-b { min-height: 420px; }
.model-name { font-size: 0.95em; opacity: 0.85; }
#storage-notice { border-left: 4px solid var(--color-accent); padding: 2px 10px; }
#chat-note, #arena-note { color: var(--body-text-color-subdued); }
"""


def build_ui(engines: dict[str, Any], store: Any = None, *, system_prompt: str = SYSTEM_PROMPT,
             notice: str | None = None) -> gr.Blocks:
    names = list(engines)
    with gr.Blocks(title="rlhfchat") as demo:
        gr.Markdown("## rlhfchat\nOpenAI-compatible API at `/v1`: [API docs](v1/docs) · "
                    "[OpenAPI spec](v1/openapi.json)", elem_id="header")
        if notice:
            gr.Markdown(as_text(notice), elem_id="storage-notice")
        with gr.Tab("Chat", id="chat"):
            _chat_tab(engines, store, names, system_prompt)
        if len(names) >= 2:
            with gr.Tab("Arena", id="arena"):
                arena_tab(engines, store, names, system_prompt)
            if store is not None:
                with gr.Tab("Leaderboard", id="leaderboard") as tab:
                    leaderboard_tab(store, tab)
    demo.queue(default_concurrency_limit=None)  # the engines batch and queue requests themselves
    return demo


def _chat_tab(engines: dict[str, Any], store: Any, names: list[str], system_prompt: str) -> None:
    window = {n: int(e.context_window) for n, e in engines.items()}
    if len(names) == 1:
        gr.Markdown(f"Model: **{as_text(names[0])}**", elem_id="model-name", elem_classes="model-name")
        model = gr.State(names[0])
    else:
        model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model-name")
    chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=480, sanitize_html=True, render_markdown=True,
                         allow_tags=False, feedback_options=("Like", "Dislike"), buttons=["copy"],
                         placeholder="Ask anything. Replies stream as they are written.")
    note = gr.Markdown("", elem_id="chat-note")
    with gr.Row():
        box = gr.Textbox(placeholder="Type a message (Enter sends, Shift+Enter for a new line)", lines=1, max_lines=12,
                         show_label=False, scale=8, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="regen-btn")
        clear = gr.Button("Clear", elem_id="clear-btn")
    controls = sampling_controls(system_prompt, window[names[0]])
    state = gr.State({"conv": None, "messages": [], "reply_ids": []})

    async def reply(state: dict[str, Any], model_name: str, system: str, *sampling: Any) -> Any:
        """Stream the assistant's reply to the conversation in `state` (which ends with a user message)."""
        state = {**state, "messages": list(state["messages"]), "reply_ids": list(state["reply_ids"])}
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + prompt_of(state["messages"])
        engine = engines[model_name]
        try:
            req = await asyncio.to_thread(engine.submit, prompt, sampling_from(*sampling))  # tokenizes
        except RlhfchatError as e:  # busy, or the message alone is longer than the model takes
            gr.Warning(str(e))
            yield display(state["messages"]), state, ""
            return
        shown_note = dropped_note(prompt, req.messages, model_name, window[model_name])
        if store is not None and state["conv"] is None:  # before streaming: Stop may end this handler early
            state["conv"] = await asyncio.to_thread(store.new_conversation, "web")
        reply_id = uuid.uuid4().hex
        state["messages"].append({"role": "assistant", "content": "", "model": model_name})
        state["reply_ids"] += [None] * (len(state["messages"]) - 1 - len(state["reply_ids"])) + [reply_id]
        try:
            async for piece in req:
                last = state["messages"][-1]
                state["messages"][-1] = {**last, "content": last["content"] + piece}
                yield display(state["messages"]), state, shown_note
        except RlhfchatError as e:
            gr.Warning(str(e))
        finally:  # also when Stop cancels this handler: the reply so far is kept and stored
            req.cancel()
            try:
                await record_reply(store, state, "web", await asyncio.to_thread(req.result, 10), reply_id)
            except (RlhfchatError, TimeoutError):  # failed, or stopped before it started: nothing to store
                pass
        yield display(state["messages"]), state, shown_note

    async def send_message(text: str, state: dict[str, Any], model_name: str, *rest: Any) -> Any:
        if not text.strip():
            yield gr.update(), display(state["messages"]), state, gr.update()
            return
        state = {**state, "messages": [*state["messages"], {"role": "user", "content": text}]}
        yield "", display(state["messages"]), state, gr.update()
        async for shown, new_state, shown_note in reply(state, model_name, *rest):
            yield "", shown, new_state, shown_note

    async def regenerate(state: dict[str, Any], model_name: str, *rest: Any) -> Any:
        messages = list(state["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            yield display(messages), state, gr.update()
            return
        state = {**state, "messages": messages, "reply_ids": state["reply_ids"][:len(messages)]}
        async for out in reply(state, model_name, *rest):
            yield out

    def on_like(state: dict[str, Any], data: gr.LikeData) -> None:
        rate_reply(store, state["reply_ids"], data)

    inputs = [box, state, model, *controls]
    outputs = [box, chatbot, state, note]
    events = [box.submit(send_message, inputs, outputs), send.click(send_message, inputs, outputs),
              regen.click(regenerate, [state, model, *controls], [chatbot, state, note])]
    stop.click(None, None, None, cancels=events)

    def reset() -> Any:
        return [], {"conv": None, "messages": [], "reply_ids": []}, ""

    clear.click(reset, None, [chatbot, state, note], cancels=events)
    chatbot.clear(reset, None, [chatbot, state, note], cancels=events)  # the chatbot's own trash button
    chatbot.like(on_like, [state], None)
    if len(names) > 1:
        max_new = controls[4]

        def bound(name: str, value: float) -> Any:  # the slider follows the chosen model's context window
            w = window[name]
            return gr.update(maximum=w, value=min(int(value), w), label=f"Max new tokens (the context window is {w})")

        model.change(bound, [model, max_new], [max_new])
