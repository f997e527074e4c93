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
import re
import uuid
from typing import Any

import gradio as gr

from rlhfchat.chat.engine import SamplingParams
from rlhfchat.data.chat_format import SYSTEM_PROMPT
from rlhfchat.errors import RlhfchatError

_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`)", re.S)
DEFAULT_MAX_NEW = 256
CSS = """
#chatbot, #arena-a, #arena-b { min-height: 420px; }
.model-name { font-size: 0.95em; opacity: 0.85; }
#storage-notice { border-left: 4px solid var(--color-accent); padding: 2px 10px; }
#chat-note, #arena-note { color: var(--body-text-color-subdued); }
"""


def as_text(text: str) -> str:
    """Markdown that shows `text` literally wherever it would be HTML: escape & and < outside code
    (markdown renders code spans and blocks as text already)."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;")
    return "".join(parts)


def model_label(name: str) -> str:
    """The line above a reply that says which model wrote it."""
    return f"<sub>**{as_text(name).replace('*', '&#42;').replace('_', '&#95;')}**</sub>"


def display(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """What the chatbot shows: each message as text, a reply under the name of its model (its "model" key)."""
    out = []
    for m in messages:
        text = as_text(m["content"])
        if m["role"] == "assistant" and m.get("model"):
            text = f"{model_label(m['model'])}\n\n{text}"
        out.append({"role": m["role"], "content": text})
    return out


def prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the model sees them (without the page's own keys)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def dropped_note(sent: list[dict[str, str]], used: list[dict[str, str]], who: str, window: int) -> str:
    """A visible note when the engine left out the oldest turns so that the conversation fits the context."""
    dropped = len(sent) - len(used)
    if dropped <= 0:
        return ""
    return (f"⚠️ The oldest {dropped} message{'s' if dropped > 1 else ''} of this conversation "
            f"{'were' if dropped > 1 else 'was'} left out of what {as_text(who)} saw: the conversation and the reply "
            f"must fit its context window of {window} tokens. Lower *Max new tokens*, or *Clear* to start over.")


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


def _thumb(store: Any, reply_ids: list[str | None], data: gr.LikeData) -> None:
    """A like or dislike on the reply at data.index (nothing for a reply not stored)."""
    index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
    if store is None or not isinstance(index, int) or index >= len(reply_ids) or reply_ids[index] is None:
        return
    try:
        store.thumb(reply_ids[index], True if data.liked is True else False if data.liked is False else None)
    except RlhfchatError:  # the reply was not stored (e.g. still streaming)
        gr.Warning("Wait for the reply to finish before rating it.")


def build_ui(engines: dict[str, Any], store: Any = None, *, system_prompt: str = SYSTEM_PROMPT,
             notice: str | None = None) -> gr.Blocks:
    from rlhfchat.chat.web_arena import arena_tab, leaderboard_tab

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


def sampling_controls(system_prompt: str, max_tokens: int, ids: str = "") -> list[Any]:
    """System prompt and sampling settings; the max-tokens slider goes up to `max_tokens` (a context window).
    `ids` prefixes the elements' ids (each tab has its own)."""
    with gr.Accordion("System prompt and sampling", open=False, elem_id=f"{ids}sampling"):
        system = gr.Textbox(system_prompt, label="System prompt", lines=2, elem_id=f"{ids}system-prompt")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                    elem_id=f"{ids}temperature")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top k (0 = off)")
        with gr.Row():
            max_new = gr.Slider(1, max_tokens, value=min(DEFAULT_MAX_NEW, max_tokens // 2 or 1), step=1,
                                label=f"Max new tokens (the context window is {max_tokens})",
                                elem_id=f"{ids}max-new-tokens")
            rep = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id=f"{ids}seed")
    return [system, temperature, top_p, top_k, max_new, rep, seed]


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
            req = await asyncio.to_thread(engine.submit, prompt, _params(*sampling))  # tokenizes
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
                await _record(store, state, "web", await asyncio.to_thread(req.result, 10), reply_id)
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
        _thumb(store, state["reply_ids"], data)

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
