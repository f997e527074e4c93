"""The web page in a real browser: Debian's chromium driven by playwright against a live `rlhfchat serve`.

The server serves two copies of the tiny model with different context windows (tiny_a 2048 positions, tiny_b 3000),
so that the max-tokens slider has something to follow and a greedy reply runs for seconds (there is time to press
Stop). Screenshots of each state are written to the test's temporary folder (`shots/`)."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from _chat_server import long_context_copy, running_server

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
NOTICE = "Conversations, ratings and votes on this page are stored and used to train the next model."
TOAST = "[data-testid='toast-body']"


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
    models = [long_context_copy(tiny_model_dir, work / "tiny_a", 2048), long_context_copy(tiny_model_dir,
                                                                                          work / "tiny_b", 3000)]
    with running_server(models, work, "--db", str(work / "feedback.db"), "--notice", NOTICE) as url:
        store = FeedbackStore(work / "feedback.db")
        yield url, store
        store.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("shots")


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


def test_a_message_gets_a_streamed_reply_with_thumbs(page, site):
    _, store = site
    before = store.counts()
    assert page.input_value("#model-name input") == "tiny_a"  # the model's name is shown
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


def test_arena_vote_reveals_the_names_and_is_stored(page, site):
    _, store = site
    votes = len(store.arena_votes())
    page.get_by_role("tab", name="Arena").click()
    page.wait_for_selector("#arena-input textarea")
    send(page, "Which is better, tea or coffee?", box="#arena-input textarea")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=60_000)
    reveal = page.inner_text("#arena-reveal")
    assert "tiny_a" not in reveal and "tiny_b" not in reveal  # anonymous before the vote
    assert page.locator("#arena-a [data-testid='bot']").count() == 1
    assert page.locator("#arena-b [data-testid='bot']").count() == 1
    page.click("#vote-a")
    wait_for(lambda: "Model A was" in page.inner_text("#arena-reveal"), what="the names to be revealed")
    wait_for(lambda: len(store.arena_votes()) == votes + 1, what="the vote to be stored")
    vote = store.arena_votes()[-1]
    reveal = page.inner_text("#arena-reveal")
    assert vote["winner"] == "a" and {vote["model_a"], vote["model_b"]} == {"tiny_a", "tiny_b"}
    assert f"Model A was {vote['model_a']}, model B was {vote['model_b']}" in reveal
    assert page.locator("#vote-b").is_disabled()  # one vote per round
    export = [r for r in store.preference_records() if r["id"] == f"feedback-arena-{vote['id']}"]
    a, b = store.reply(vote["reply_a_id"]), store.reply(vote["reply_b_id"])
    if a["content"] != b["content"]:
        assert export and export[0]["chosen"] == a["content"] and export[0]["rejected"] == b["content"]


def label_and_text(bot) -> tuple[str, str]:
    """A reply's label line (the model that wrote it) and its text."""
    label, _, text = bot.inner_text().strip().partition("\n")
    return label.strip(), text.strip()


def set_number(page, selector: str, value: int) -> None:
    """Type `value` into a slider's number box and wait until the slider shows it: the page has taken the value
    before the test goes on (a send right after a change the page had not taken yet sampled with the old setting)."""
    box = page.locator(f"{selector} input[type='number']").first
    slider = page.locator(f"{selector} input[type='range']")
    # typed again until the slider shows it: in a fresh checkout the first change could land before the page
    # listened (the slider stayed where it was for the whole wait: in fresh checkouts, twice in `.ci/run` and once
    # in a first run of this test alone; not in its reruns)
    deadline = time.time() + 60
    while True:
        box.fill(str(value))
        box.press("Enter")
        if not slider.count():
            return
        try:
            wait_for(lambda: float(slider.first.input_value()) == float(value), timeout=5, what=f"{selector} at {value}")
            return
        except AssertionError:
            if time.time() > deadline:
                raise


def test_each_reply_names_its_model_the_slider_follows_the_context_and_dropped_turns_are_said(page, site, shots):
    _, store = site
    n = store.counts()["replies"]
    page.get_by_text("System prompt and sampling").first.click()
    page.locator("#seed input").first.fill("0")
    slider = page.locator("#max-new-tokens input[type='range']")
    assert slider.get_attribute("max") == "2048"  # tiny_a's context window
    send(page, "What is 2 + 3?")
    wait_for(lambda: store.counts()["replies"] == n + 1, what="tiny_a's reply")
    page.locator("#model-name input").click()
    page.get_by_role("option", name="tiny_b").click()
    wait_for(lambda: slider.get_attribute("max") == "3000", what="the slider to follow tiny_b's context window")
    assert "context window is 3000" in page.inner_text("#max-new-tokens")
    send(page, "And 4 + 4?")
    wait_for(lambda: store.counts()["replies"] == n + 2, what="tiny_b's reply")
    bots = page.locator(BOT)
    wait_for(lambda: bots.count() == 2, what="two replies")
    assert [label_and_text(bots.nth(i))[0] for i in range(2)] == ["tiny_a", "tiny_b"]  # also after the switch
    stored = [store.reply(r) for r in _last_reply_ids(store, 2)]
    assert [r["model"] for r in stored] == ["tiny_a", "tiny_b"]
    assert all(label_and_text(bots.nth(i))[1] for i in range(2))  # the reply's text under its label
    assert page.inner_text("#chat-note").strip() == ""
    page.screenshot(path=str(shots / "chat-two-models.png"), full_page=True)

    # a reply as long as the context window leaves no room for the earlier turns: they go, and the page says so
    set_number(page, "#max-new-tokens", 3000)
    send(page, "And 5 + 5?")
    wait_for(lambda: "left out" in page.inner_text("#chat-note"), what="the note on dropped turns")
    wait_for(lambda: store.counts()["replies"] == n + 3, timeout=90, what="the third reply")
    note = page.inner_text("#chat-note")
    assert "The oldest 4 messages of this conversation were left out of what tiny_b saw" in note
    assert "context window of 3000 tokens" in note
    [third] = [store.reply(r) for r in _last_reply_ids(store, 1)]
    assert [m["content"] for m in third["prompt"] if m["role"] != "system"] == ["And 5 + 5?"]
    page.screenshot(path=str(shots / "chat-dropped-turns.png"), full_page=True)


def _last_reply_ids(store: FeedbackStore, k: int) -> list[str]:
    from sqlalchemy import select

    from rlhfchat.chat.feedback import Reply

    with store.Session() as s:
        return list(reversed(s.scalars(select(Reply.id).order_by(Reply.created_at.desc()).limit(k)).all()))


def test_the_page_links_the_api_docs_and_shows_the_notice(page, site):
    assert page.inner_text("#storage-notice").strip() == NOTICE
    assert page.get_by_text("Use via API").count() == 0  # Gradio's own API page is not offered
    link = page.get_by_role("link", name="API docs")
    with page.context.expect_page() as opened:  # Gradio opens a markdown link in a new tab
        link.click()
    docs = opened.value
    docs.wait_for_load_state()
    # FastAPI's Swagger UI page (its scripts come from a CDN, out of reach here: the page itself is checked)
    assert docs.url == f"{site[0]}/v1/docs" and docs.title() == "rlhfchat - Swagger UI"
    assert "/v1/openapi.json" in docs.content()
    spec = page.get_by_role("link", name="OpenAPI spec").get_attribute("href")
    assert "/v1/feedback" in httpx.get(f"{site[0]}/{spec}").json()["paths"]


def arena_bots(page) -> tuple:
    return page.locator("#arena-a [data-testid='bot']"), page.locator("#arena-b [data-testid='bot']")


def test_arena_stop_regenerate_and_send_after_a_vote(page, site, shots):
    _, store = site
    page.get_by_role("tab", name="Arena").click()
    page.wait_for_selector("#arena-input textarea")
    page.locator("#arena-sampling").get_by_text("System prompt and sampling").click()
    slider = page.locator("#arena-max-new-tokens input[type='range']")
    assert slider.get_attribute("max") == "2048"  # the smallest context window served: it tells nothing
    set_number(page, "#arena-temperature", 0)
    set_number(page, "#arena-max-new-tokens", 2000)  # greedy, and no EOS on these weights: seconds of text
    n = store.counts()["replies"]

    # Stop: both replies end where they are, are stored, and can be voted on
    send(page, "Tell me a long story.", box="#arena-input textarea")
    a, b = arena_bots(page)
    wait_for(lambda: a.count() and b.count() and len(a.first.inner_text()) > 20 and len(b.first.inner_text()) > 20,
             what="both replies to stream")
    send(page, "Another prompt?", box="#arena-input textarea")  # while they answer: said why not
    wait_for(lambda: "still answering" in " ".join(page.locator(TOAST).all_inner_texts()), what="the busy warning")
    page.click("#arena-stop")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=30_000)
    assert "Stopped" in page.inner_text("#arena-note")
    wait_for(lambda: store.counts()["replies"] == n + 2, what="the stopped replies to be stored")
    stopped = [store.reply(r) for r in _last_reply_ids(store, 2)]
    assert [r["finish_reason"] for r in stopped] == ["cancelled"] * 2
    assert all(0 < r["completion_tokens"] < 1900 for r in stopped)
    page.screenshot(path=str(shots / "arena-stopped.png"), full_page=True)

    # Regenerate: both models asked again, the new replies in place of the old
    set_number(page, "#arena-max-new-tokens", 12)
    page.click("#arena-regen")
    wait_for(lambda: store.counts()["replies"] == n + 4, what="the regenerated replies")
    page.wait_for_selector("#vote-b:not([disabled])", timeout=30_000)
    assert a.count() == 1 and b.count() == 1 and page.locator("#arena-a [data-testid='user']").count() == 1
    fresh = [store.reply(r) for r in _last_reply_ids(store, 2)]
    assert all(r["completion_tokens"] <= 12 for r in fresh)
    page.click("#vote-b")
    wait_for(lambda: "Model A was" in page.inner_text("#arena-reveal"), what="the reveal")
    vote = store.arena_votes()[-1]
    assert {vote["reply_a_id"], vote["reply_b_id"]} == set(_last_reply_ids(store, 2))  # the regenerated pair
    assert page.inner_text("#arena-a").startswith(f"Model A: {vote['model_a']}")  # each side under its model
    assert page.inner_text("#arena-b").startswith(f"Model B: {vote['model_b']}")
    page.screenshot(path=str(shots / "arena-voted.png"), full_page=True)

    # after the vote: Regenerate says why not; Send starts a new round, with two models drawn again
    page.click("#arena-regen")
    wait_for(lambda: "You have voted" in " ".join(page.locator(TOAST).all_inner_texts()), what="the warning")
    send(page, "Which is better, tea or coffee?", box="#arena-input textarea")
    wait_for(lambda: "New round" in page.inner_text("#arena-note"), what="the new round")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=30_000)
    assert page.locator("#arena-a [data-testid='user']").all_inner_texts() == ["Which is better, tea or coffee?"]
    assert page.inner_text("#arena-reveal").strip() == ""
    assert page.inner_text("#arena-a").startswith("Model A\n")  # anonymous again
    assert store.counts()["replies"] == n + 6
    page.screenshot(path=str(shots / "arena-new-round.png"), full_page=True)


def test_the_leaderboard_shows_the_arena_ratings(page, site, shots):
    from rlhfchat.chat.feedback import arena_leaderboard

    _, store = site
    conv = store.new_conversation("arena")
    question = [{"role": "user", "content": "Which is better?"}]
    for k in range(20):  # tiny_b wins most of these votes
        ra = store.add_reply(conv, model="tiny_a", prompt=question, content=f"a{k}", sampling={})
        rb = store.add_reply(conv, model="tiny_b", prompt=question, content=f"b{k}", sampling={})
        store.arena_vote(ra, rb, "b" if k % 4 else "tie")
    expected = arena_leaderboard(store, 1000, 0)
    page.get_by_role("tab", name="Leaderboard").click()
    wait_for(lambda: page.locator("#leaderboard table tbody tr").count() == 2, what="the leaderboard")
    rows = [[c.strip() for c in tr.split("\t")] for tr in page.locator("#leaderboard table tbody tr").all_inner_texts()]
    assert rows == [[str(i), r.model, f"{r.rating:.0f}", f"{r.lower:.0f} to {r.upper:.0f}", str(r.battles),
                     f"{r.wins} / {r.ties} / {r.losses}"] for i, r in enumerate(expected, 1)]
    assert rows[0][1] == "tiny_b" and expected[0].lower > expected[1].upper  # clearly ahead
    votes = len(store.battles())
    assert f"Ratings from {votes} arena votes" in page.inner_text("#leaderboard")
    page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
