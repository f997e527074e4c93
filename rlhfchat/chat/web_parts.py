"""What the web page's tabs share (web.py's Chat tab, web_arena.py's Arena and Leaderboard): messages shown as text
(`as_text`: no HTML a user or a model typed ever runs), model labels, the dropped-turns note, the sampling controls
and the SamplingParams they make, and storing and rating replies in the feedback store."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import gradio as gr

from rlhfchat.chat.request import SamplingParams
from rlhfchat.errors import RlhfchatError

_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`)", re.S)
DEFAULT_MAX_NEW = 256


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


def sampling_from(temperature: float, top_p: float, top_k: float, max_new_tokens: float, repetition_penalty: float,
            seed: float) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                          seed=None if seed is None or int(seed) < 0 else int(seed))


async def record_reply(store: Any, state: dict[str, Any], source: str, completion: Any, reply_id: str) -> None:
    """Store a finished (or stopped) reply under the state's conversation (created on the first reply)."""
    if store is None or completion is None:
        return
    if state.get("conv") is None:
        state["conv"] = await asyncio.to_thread(store.new_conversation, source)
    await asyncio.to_thread(store.add_reply, state["conv"], completion, reply_id=reply_id)


def rate_reply(store: Any, reply_ids: list[str | None], data: gr.LikeData) -> None:
    """A like or dislike on the reply at data.index (nothing for a reply not stored)."""
    index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
    if store is None or not isinstance(index, int) or index >= len(reply_ids) or reply_ids[index] is None:
        return
    try:
        store.thumb(reply_ids[index], True if data.liked is True else False if data.liked is False else None)
    except RlhfchatError:  # the reply was not stored (e.g. still streaming)
        gr.Warning("Wait for the reply to finish before rating it.")


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
