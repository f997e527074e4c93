"""The web page in a real browser: Debian's chromium driven by playwright against a live `rlhfchat serve`."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from _chat_server import running_server

from rlhfchat.chat.feedback import FeedbackStore

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def site(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    second = work / "tiny_b"
    shutil.copytree(tiny_model_dir, second)  # a second model, for the arena
    with running_server([tiny_model_dir, second], work, "--db", str(work / "feedback.db")) as url:
        store = FeedbackStore(work / "feedback.db")
        yield url, store
        store.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(site[0])
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    yield page
    context.close()


def send(page, text: str, box: str = "#chat-input textarea") -> None:
    page.fill(box, text)
    page.press(box, "Enter")


def test_a_message_gets_a_streamed_reply_with_thumbs(page, site, tiny_model_dir):
    _, store = site
    before = store.counts()
    assert page.input_value("#model-name input") == tiny_model_dir.name  # the model's name is shown
    # record every length the reply's text takes while it streams in
    page.evaluate("""() => { window.lens = []; new MutationObserver(() => {
        const bots = document.querySelectorAll("#chatbot [data-testid='bot']");
        if (bots.length) window.lens.push(bots[bots.length - 1].innerText.length);
    }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true}); }""")
    # A fixed seed: the tiny random model's sampled reply is then always the same non-empty text (unseeded, about
    # one reply in twenty is an immediate EOS).
    page.get_by_text("System prompt and sampling").first.click()
    page.locator("#seed input").first.fill("0")
    send(page, "Hello there, what is 2 + 3?")
    page.wait_for_selector(USER)
    assert page.inner_text(USER) == "Hello there, what is 2 + 3?"
    wait_for(lambda: store.counts()["replies"] == before["replies"] + 1, what="the reply to be stored")
    reply_text = page.locator(BOT).last.inner_text()
    lens = page.evaluate("window.lens")
    assert reply_text.strip() and len({n for n in lens if n > 0}) >= 2, lens  # it grew piece by piece

    page.locator("#chatbot button[aria-label='Like']").last.click()
    wait_for(lambda: store.counts()["thumbs"] == before["thumbs"] + 1, what="the thumb to be stored")
    records = store.preference_records()  # one thumb alone makes no pair yet
    assert all(r["source"] == "feedback" for r in records)


def test_regenerate_and_clear(page, site):
    _, store = site
    n = store.counts()["replies"]
    send(page, "Write a function that doubles a number.")
    wait_for(lambda: store.counts()["replies"] == n + 1, what="the first reply")
    page.click("#regen-btn")
    wait_for(lambda: store.counts()["replies"] == n + 2, what="the regenerated reply")
    assert page.locator(USER).count() == 1 and page.locator(BOT).count() == 1  # replaced, not added
    page.click("#clear-btn")
    wait_for(lambda: page.locator(USER).count() == 0, what="the chat to clear")


def test_html_and_script_in_a_message_are_shown_as_text(page, site):
    _, store = site
    n = store.counts()["replies"]
    script, img = "<script>alert('xss-1')</script>", "<img src=x onerror=alert('xss-2')>"
    send(page, f"{script} and {img} and <b>bold?</b>")
    wait_for(lambda: store.counts()["replies"] == n + 1, what="the reply")
    shown = page.locator(USER).last.inner_text()
    assert script in shown and img in shown and "<b>bold?</b>" in shown  # literally, as typed
    assert page.locator("#chatbot img[src='x']").count() == 0
    assert page.locator("#chatbot script").count() == 0 and page.locator("#chatbot b").count() == 0
    time.sleep(0.5)
    assert page.dialogs == []  # no alert ever fired


def test_arena_vote_reveals_the_names_and_is_stored(page, site, tiny_model_dir):
    _, store = site
    votes = len(store.arena_votes())
    page.get_by_role("tab", name="Arena").click()
    page.wait_for_selector("#arena-input textarea")
    send(page, "Which is better, tea or coffee?", box="#arena-input textarea")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=60_000)
    reveal = page.inner_text("#arena-reveal")
    assert tiny_model_dir.name not in reveal and "tiny_b" not in reveal  # anonymous before the vote
    assert page.locator("#arena-a [data-testid='bot']").count() == 1
    assert page.locator("#arena-b [data-testid='bot']").count() == 1
    page.click("#vote-a")
    wait_for(lambda: "Model A was" in page.inner_text("#arena-reveal"), what="the names to be revealed")
    wait_for(lambda: len(store.arena_votes()) == votes + 1, what="the vote to be stored")
    vote = store.arena_votes()[-1]
    reveal = page.inner_text("#arena-reveal")
    assert vote["winner"] == "a" and {vote["model_a"], vote["model_b"]} == {tiny_model_dir.name, "tiny_b"}
    assert f"Model A was {vote['model_a']}, model B was {vote['model_b']}" in reveal
    assert page.locator("#vote-b").is_disabled()  # one vote per round
    export = [r for r in store.preference_records() if r["id"] == f"feedback-arena-{vote['id']}"]
    a, b = store.reply(vote["reply_a_id"]), store.reply(vote["reply_b_id"])
    if a["content"] != b["content"]:
        assert export and export[0]["chosen"] == a["content"] and export[0]["rejected"] == b["content"]
