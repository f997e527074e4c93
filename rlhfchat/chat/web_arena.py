"""The arena and leaderboard tabs of the web page (web.py builds the page).

Arena: one prompt goes to two models drawn at random, shown as "Model A" and "Model B" and streamed side by side.
Stop ends both replies where they are (they are kept, stored and can be voted on); Regenerate asks both models
again. The user votes A, B, tie or both bad; only then are the names revealed (above each side). Send after a vote
starts a new round with two models drawn again; Send or Regenerate while the models are still answering, or
Regenerate after a vote, says why it does nothing. The max-tokens slider is bounded by the smallest context window
served (a bound per pair would tell which models were drawn).

Leaderboard: the arena's votes in the feedback store as Bradley-Terry ratings on the Elo scale with bootstrap
intervals (eval/leaderboard.py, FastChat's method), refreshed when the tab is opened.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import gradio as gr

from rlhfchat.chat.web_parts import (
    as_text, display, dropped_note, rate_reply, record_reply, sampling_controls, sampling_from,
)
from rlhfchat.errors import RlhfchatError

VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
SIDES = ("A", "B")
BUSY = "Both models are still answering: wait for them, or press Stop."
LEADERBOARD_BOOTSTRAP = 1000


def arena_tab(engines: dict[str, Any], store: Any, names: list[str], system_prompt: str) -> None:
    gr.Markdown("Two anonymous models answer the same prompt. Vote for the better answer; "
                "the models' names are shown after your vote.")
    with gr.Row():
        bots = [gr.Chatbot(elem_id=f"arena-{side.lower()}", label=f"Model {side}", height=420, sanitize_html=True,
                           render_markdown=True, allow_tags=False, feedback_options=("Like", "Dislike"),
                           buttons=["copy"]) for side in SIDES]
    note = gr.Markdown("", elem_id="arena-note")
    with gr.Row():
        box = gr.Textbox(placeholder="Type a prompt for both models (Enter sends, Shift+Enter for a new line)",
                         lines=1, max_lines=12, show_label=False, scale=8, elem_id="arena-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="arena-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="arena-stop")
    with gr.Row():
        vote_btns = {w: gr.Button(label, interactive=False, elem_id=f"vote-{w.replace('_', '-')}")
                     for w, label in VOTES.items()}
    reveal = gr.Markdown("", elem_id="arena-reveal")
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="arena-regen")
        new_round = gr.Button("New round", elem_id="new-round")
    window = min(int(engines[n].context_window) for n in names)
    controls = sampling_controls(system_prompt, window, ids="arena-")
    live: dict[str, list[Any]] = {}  # a round's running requests, for Stop

    def fresh() -> dict[str, Any]:
        return {"models": random.sample(names, 2), "conv": None, "messages": [[], []], "reply_ids": [[], []],
                "voted": False, "last": None, "busy": False, "round": uuid.uuid4().hex}

    state = gr.State(fresh)
    votes_off = [gr.update(interactive=False)] * len(vote_btns)
    votes_on = [gr.update(interactive=True)] * len(vote_btns)

    def sides(state: dict[str, Any]) -> list[Any]:
        """Both chatbots: their messages, and their labels (the model's name once the user has voted)."""
        return [gr.update(value=display(m), label=f"Model {side}: {state['models'][i]}" if state["voted"]
                          else f"Model {side}") for i, (side, m) in enumerate(zip(SIDES, state["messages"]))]

    async def answer(state: dict[str, Any], before: dict[str, Any], system: str, sampling: tuple[Any, ...],
                     told: str = "") -> Any:
        """Both models answer the conversation in `state` (each side ends with the same user message); yields
        (box, bot A, bot B, state, *votes, note, reveal) as the replies stream. `before`: what to show when neither
        can."""
        prompts = [([{"role": "system", "content": system}] if system.strip() else []) + m
                   for m in state["messages"]]
        reqs: list[Any] = []
        try:
            params = sampling_from(*sampling)  # a seed out of range is a warning, as a busy model is
            for i in (0, 1):  # off the event loop: submit tokenizes
                reqs.append(await asyncio.to_thread(engines[state["models"][i]].submit, prompts[i], params))
        except RlhfchatError as e:
            for r in reqs:  # the other model's reply, if it had started
                r.cancel()
            gr.Warning(str(e))
            yield (gr.skip(), *sides(before), before, *(votes_on if before["last"] else votes_off), gr.skip(),
                   gr.skip())
            return
        notes = [dropped_note(prompts[i], reqs[i].messages, f"Model {SIDES[i]}",
                              engines[state["models"][i]].context_window) for i in (0, 1)]
        told = "\n\n".join(n for n in [told, *notes] if n)
        reply_ids = [uuid.uuid4().hex, uuid.uuid4().hex]
        texts = ["", ""]
        for i in (0, 1):
            state["messages"][i].append({"role": "assistant", "content": ""})
            state["reply_ids"][i] += [None] * (len(state["messages"][i]) - 1 - len(state["reply_ids"][i]))
            state["reply_ids"][i].append(reply_ids[i])
        state["busy"], state["last"] = True, None
        live[state["round"]] = reqs
        changed = asyncio.Event()

        async def pump(i: int) -> None:
            async for piece in reqs[i]:
                texts[i] += piece
                changed.set()

        tasks = [asyncio.create_task(pump(i)) for i in (0, 1)]

        def snapshot() -> Any:
            for i in (0, 1):
                state["messages"][i][-1] = {"role": "assistant", "content": texts[i]}
            return ("", *sides(state), state, *votes_off, told, "")

        yield snapshot()
        try:
            while not all(t.done() for t in tasks):
                waiter = asyncio.ensure_future(changed.wait())
                await asyncio.wait([waiter, *(t for t in tasks if not t.done())], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                changed.clear()
                yield snapshot()
        finally:  # also when New round cancels this handler
            live.pop(state["round"], None)
            for t in tasks:
                t.cancel()
            for r in reqs:
                r.cancel()
        state["busy"] = False
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:  # a failed reply cannot be voted on
            gr.Warning(str(errors[0]))
            yield ("", *sides(state), state, *votes_off, told, "")
            return
        completions = [await asyncio.to_thread(r.result, 5) for r in reqs]
        for i in (0, 1):
            state["messages"][i][-1] = {"role": "assistant", "content": completions[i].text}
            await record_reply(store, state, "arena", completions[i], reply_ids[i])
        state["last"] = reply_ids
        if any(c.finish_reason == "cancelled" for c in completions):
            told = "\n\n".join(n for n in [told, "Stopped: vote on the replies as they are, or Regenerate."] if n)
        yield ("", *sides(state), state, *votes_on, told, "")

    nothing = (gr.skip(),) * (6 + len(vote_btns))  # every output as it is

    async def send_prompt(text: str, state: dict[str, Any], system: str, *sampling: Any) -> Any:
        if state["busy"]:
            gr.Warning(BUSY)
            yield nothing
            return
        if not text.strip():
            yield nothing
            return
        before, told = state, ""
        if state["voted"]:  # the round is over: a new one, with two models drawn again
            state, told = fresh(), "**New round:** two models drawn again (your vote on the last round is stored)."
        state = {**state, "messages": [[*m, {"role": "user", "content": text}] for m in state["messages"]],
                 "reply_ids": [list(r) for r in state["reply_ids"]]}
        async for out in answer(state, before, system, sampling, told):
            yield out

    async def regenerate(state: dict[str, Any], system: str, *sampling: Any) -> Any:
        why = (BUSY if state["busy"] else "You have voted on these replies: Send a new prompt to start a new round."
               if state["voted"] else None)
        if why or not state["messages"][0] or state["messages"][0][-1]["role"] != "assistant":
            if why:
                gr.Warning(why)
            yield nothing
            return
        before = state
        state = {**state, "messages": [m[:-1] for m in state["messages"]],
                 "reply_ids": [r[:len(m) - 1] for r, m in zip(state["reply_ids"], state["messages"])]}
        async for out in answer(state, before, system, sampling):
            yield out

    def stop_round(state: dict[str, Any]) -> None:
        for r in live.get(state["round"], []):
            r.cancel()  # the engines end both replies where they are; `answer` then stores them

    def vote(winner: str) -> Any:
        def handler(state: dict[str, Any]) -> Any:
            if state.get("voted") or not state.get("last"):
                return (gr.skip(),) * (4 + len(vote_btns))
            if store is not None:
                store.arena_vote(state["last"][0], state["last"][1], winner)
            state = {**state, "voted": True}
            a, b = (as_text(n) for n in state["models"])
            text = (f"**You voted: {VOTES[winner]}.** Model A was **{a}**, model B was **{b}**. "
                    "Send a new prompt to start a new round.")
            return (state, text, *votes_off, *sides(state))
        return handler

    def start_new() -> Any:
        s = fresh()
        return (s, "", *sides(s), "", "", *votes_off)

    outputs = [box, *bots, state, *vote_btns.values(), note, reveal]
    inputs = [box, state, *controls]
    # "multiple": a second Send while the models answer reaches send_prompt, which says why it does nothing
    # (Gradio's default, "once", drops it without a word)
    events = [box.submit(send_prompt, inputs, outputs, trigger_mode="multiple"),
              send.click(send_prompt, inputs, outputs, trigger_mode="multiple"),
              regen.click(regenerate, [state, *controls], outputs, trigger_mode="multiple")]
    stop.click(stop_round, [state], None)
    for w, btn in vote_btns.items():
        btn.click(vote(w), [state], [state, reveal, *vote_btns.values(), *bots])
    for trigger in (new_round.click, *(bot.clear for bot in bots)):  # clearing either side starts over
        trigger(start_new, None, [state, reveal, *bots, box, note, *vote_btns.values()], cancels=events)

    def on_like(side: int) -> Any:
        def handler(state: dict[str, Any], data: gr.LikeData) -> None:
            rate_reply(store, state["reply_ids"][side], data)
        return handler

    for side, bot in enumerate(bots):
        bot.like(on_like(side), [state], None)


def leaderboard_markdown(store: Any, bootstrap: int = LEADERBOARD_BOOTSTRAP, seed: int = 0) -> str:
    """The leaderboard as the page shows it (blocking: the ratings are refitted on every resample)."""
    from rlhfchat.chat.feedback import arena_leaderboard

    rows = arena_leaderboard(store, bootstrap, seed)
    if not rows:
        return "No arena votes between two different models yet: vote in the Arena tab, and the ratings appear here."
    votes = sum(r.battles for r in rows) // 2
    lines = [f"Ratings from **{votes}** arena vote{'s' if votes != 1 else ''}: Bradley-Terry on the Elo scale (a "
             f"100-point lead is a 64% chance to win; mean 1000), with 95% intervals from {bootstrap} bootstrap "
             "resamples of the votes, as FastChat's Chatbot Arena computes them. A tie or \"both bad\" counts half a "
             "win for each model.", "",
             "| Rank | Model | Rating | 95% interval | Votes | Wins / ties / losses |",
             "|---:|---|---:|---|---:|---|"]
    for i, r in enumerate(rows, 1):
        name = as_text(r.model).replace("|", "\\|")
        lines.append(f"| {i} | {name} | {r.rating:.0f} | {r.lower:.0f} to {r.upper:.0f} | {r.battles} | "
                     f"{r.wins} / {r.ties} / {r.losses} |")
    return "\n".join(lines)


def leaderboard_tab(store: Any, tab: Any) -> None:
    table = gr.Markdown("", elem_id="leaderboard")
    refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")

    async def show() -> str:
        return await asyncio.to_thread(leaderboard_markdown, store)

    refresh.click(show, None, table)
    tab.select(show, None, table)
