"""The OpenAI-compatible API through the real `openai` and `httpx` clients against a live `rlhfchat serve` on
127.0.0.1: chat completions, the models, the feedback API (thumbs and arena votes on completions by their id),
OpenAI-shaped errors for what it does not have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import shutil

import httpx
import openai
import pytest
from _chat_server import running_server

from rlhfchat.chat.feedback import FeedbackStore

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def server(tiny_model_dir, work):
    second = work / "copy"
    shutil.copytree(tiny_model_dir, second)  # served under a name of our choosing
    # a small batch and queue, so that a burst finds the queue full
    with running_server([tiny_model_dir], work, "--name", f"tiny-2={second}", "--max-batch", "4", "--max-queue",
                        "4", "--db", str(work / "feedback.db"), env={"RLHFCHAT_API_KEY": KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def store(server, work):
    s = FeedbackStore(work / "feedback.db")  # the server's own store (SQLite in WAL mode: both may write)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_and_health(server, client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name, "tiny-2"]  # --name chose the second
    one = client.models.retrieve("tiny-2")  # GET /v1/models/{id}
    assert one.id == "tiny-2" and one.object == "model" and one.context_window == 256
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and e.value.param == "model" and "tiny-2" in e.value.message
    health = httpx.get(f"{server}/health").json()  # no key needed
    assert health["status"] == "ok" and tiny_model_dir.name in health["models"]


def test_routes_the_api_does_not_have_answer_in_openais_error_shape(client, model, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=model, prompt="2 + 3 =")
    assert e.value.code == "not_found" and "/v1/completions" in e.value.message and "/v1/chat/completions" in \
        e.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=model, input="hi")
    r = httpx.get(f"{server}/v1/feedback", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == \
        "method_not_allowed"


def test_completion_and_stream_give_the_same_reply(client, model):
    kw = dict(model=model, messages=USER, temperature=0.9, top_p=0.95, seed=11, max_tokens=24)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == model and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert 0 < full.usage.completion_tokens <= 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # same seed, same reply, streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sampling_fields_are_honoured(client, model):
    short = client.chat.completions.create(model=model, messages=USER, max_tokens=3, temperature=0,
                                           extra_body={"top_k": 5, "repetition_penalty": 1.2})
    assert short.usage.completion_tokens <= 3
    again = client.chat.completions.create(model=model, messages=USER, max_tokens=3, temperature=0,
                                           extra_body={"top_k": 5, "repetition_penalty": 1.2})
    assert again.choices[0].message.content == short.choices[0].message.content  # greedy is deterministic
    parts = client.chat.completions.create(
        model=model, max_tokens=3, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]}])
    assert parts.usage.prompt_tokens > short.usage.prompt_tokens  # the developer message became the system prompt


@pytest.mark.parametrize("kw, param", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": USER, "temperature": 5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "extra_body": {"tools_please": True}}, "tools_please"),
    ({"messages": [*USER, {"role": "assistant", "content": "5"}]}, "messages[1].role"),
    ({"messages": [*USER, {"role": "system", "content": "late"}, *USER]}, "messages[1].role"),
])
def test_invalid_requests_get_400_naming_the_field(client, model, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, **kw)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert param.split("[")[0] in e.value.message


def test_unknown_model_bad_json_and_a_prompt_too_long(client, server, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert e.value.param == "model" and e.value.code == "model_not_found"

    for content_type in ("application/json", "text/plain"):
        r = httpx.post(f"{server}/v1/chat/completions", content="{not json",
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]

    long = [{"role": "user", "content": "word " * 400}]  # the tiny model takes 256 tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=long)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, but not with the reply asked for
        client.chat.completions.create(model=model, messages=USER, max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and "max_tokens 1000" in e.value.message
    with pytest.raises(openai.BadRequestError):  # streaming requests are checked before the stream starts
        client.chat.completions.create(model=model, messages=long, stream=True)


def test_the_api_key_is_required(server, model):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=USER)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": model, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_non_loopback_host_needs_a_key(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RLHFCHAT_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "rlhfchat.cli", "serve", str(tiny_model_dir), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr


def test_a_burst_gets_answers_or_429_and_never_a_5xx(server, model):
    statuses, streamed_ok, lock = [], [], threading.Lock()

    def call(i: int) -> None:
        body = {"model": model, "messages": USER, "max_tokens": 16, "seed": i, "stream": i % 2 == 0}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=120) as h, h.stream("POST", f"{server}/v1/chat/completions", json=body,
                                                       headers=headers) as r:
            text = r.read().decode()
            ok = r.status_code == 200 and (not body["stream"] or text.rstrip().endswith("data: [DONE]"))
            if r.status_code == 429:
                assert json.loads(text)["error"]["code"] == "busy" and r.headers["retry-after"]
            with lock:
                statuses.append(r.status_code)
                streamed_ok.append(ok or r.status_code != 200)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 32 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4 and all(streamed_ok)


def feedback(server: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}/v1/feedback", json=body, headers=headers, timeout=30)


def test_a_completions_id_rates_its_reply_with_a_thumb(client, server, model, store):
    full = client.chat.completions.create(model=model, messages=USER, max_tokens=8, seed=3)
    assert len(full.id) == 32 and full.id.startswith("chatcmpl-")
    reply = store.reply(full.id)  # stored as a reply before the answer came back
    assert reply["model"] == model and reply["content"] == full.choices[0].message.content
    assert reply["prompt"] == USER and reply["sampling"]["seed"] == 3 and reply["completion_tokens"] == \
        full.usage.completion_tokens
    r = feedback(server, {"reply_id": full.id, "thumb": "down", "comment": "It is 5.", "user": "ann"})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "feedback.thumb", "id": r.json()["id"], "reply_id": full.id, "model": model,
                        "thumb": "down", "comment": "It is 5."}
    [thumb] = store.thumbs(full.id)
    assert (thumb["value"], thumb["comment"], thumb["user"]) == (-1, "It is 5.", "ann")

    # a stream's id, rated through the openai client itself (a user's own app needs nothing else)
    chunks = list(client.chat.completions.create(model=model, messages=USER, max_tokens=8, seed=4, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert store.reply(chunks[0].id)["content"] == text  # stored before the stream ended
    out = client.post("/feedback", cast_to=object, body={"reply_id": chunks[0].id, "thumb": "up"})
    assert out["thumb"] == "up" and out["comment"] is None
    assert [t["value"] for t in store.thumbs(chunks[0].id)] == [1]


def test_an_arena_vote_on_two_models_replies_to_the_same_question(client, server, model, store):
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    a = client.chat.completions.create(model=model, messages=question, max_tokens=6, seed=1)
    b = client.chat.completions.create(model="tiny-2", messages=question, max_tokens=6, seed=2)
    votes = len(store.arena_votes())
    r = feedback(server, {"arena": {"reply_a": a.id, "reply_b": b.id, "winner": "b"}, "user": "bo"})
    assert r.status_code == 200, r.text
    assert {k: v for k, v in r.json().items() if k != "id"} == {
        "object": "feedback.arena", "reply_a": a.id, "reply_b": b.id, "model_a": model, "model_b": "tiny-2",
        "winner": "b"}
    vote = store.arena_votes()[-1]
    assert len(store.arena_votes()) == votes + 1 and vote["id"] == r.json()["id"]
    assert (vote["reply_a_id"], vote["reply_b_id"], vote["winner"], vote["user"]) == (a.id, b.id, "b", "bo")
    assert (model, "tiny-2", "b") in store.battles()  # what the leaderboard is computed from
    # a follow-up turn: each side saw its own earlier reply, and the question is still the same
    turn2 = [{"role": "user", "content": "Another?"}]
    a2 = client.chat.completions.create(model=model, max_tokens=4, seed=1, messages=[
        *question, {"role": "assistant", "content": a.choices[0].message.content}, *turn2])
    b2 = client.chat.completions.create(model="tiny-2", max_tokens=4, seed=1, messages=[
        *question, {"role": "assistant", "content": b.choices[0].message.content + "!"}, *turn2])
    assert feedback(server, {"arena": {"reply_a": a2.id, "reply_b": b2.id, "winner": "tie"}}).status_code == 200


@pytest.mark.parametrize("body, status, param, words", [
    ({"reply_id": "chatcmpl-nosuchreply", "thumb": "up"}, 404, "reply_id", "no reply"),
    ({"reply_id": "A", "thumb": "sideways"}, 400, "thumb", "'up' or 'down'"),
    ({"reply_id": "A"}, 400, "thumb", "required"),
    ({"reply_id": "A", "thumb": "up", "stars": 5}, 400, "stars", "unknown"),
    ({"reply_id": "A", "thumb": True}, 400, "thumb", ""),
    ({"reply_id": "", "thumb": "up"}, 400, "reply_id", ""),
    ({"arena": {"reply_a": "A", "reply_b": "B", "winner": "c"}}, 400, "arena.winner", "'a', 'b', 'tie' or"),
    ({"arena": {"reply_a": "A", "reply_b": "chatcmpl-nosuchreply", "winner": "a"}}, 404, "arena.reply_b",
     "no reply"),
    ({"arena": {"reply_a": "A", "reply_b": "A", "winner": "a"}}, 400, "arena.reply_b", "the same reply twice"),
    ({"arena": {"reply_a": "A", "reply_b": "OTHER", "winner": "a"}}, 400, "arena.reply_b",
     "a reply to another question"),
    ({"arena": {"reply_a": "A", "winner": "a"}}, 400, "arena.reply_b", "required"),
    ({"arena": {"reply_a": "A", "reply_b": "B", "winner": "a"}, "thumb": "up"}, 400, "thumb", "unknown"),
])
def test_bad_feedback_gets_a_4xx_naming_the_field(client, server, model, store, body, status, param, words):
    ids = {}
    for key, content in (("A", "What is 2 + 3?"), ("B", "What is 2 + 3?"), ("OTHER", "What is 4 + 4?")):
        c = client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": content}])
        ids[key] = c.id
    body = json.loads(json.dumps(body).replace('"A"', f'"{ids["A"]}"').replace('"B"', f'"{ids["B"]}"')
                      .replace('"OTHER"', f'"{ids["OTHER"]}"'))
    before = (len(store.thumbs()), len(store.arena_votes()))
    r = feedback(server, body)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and words in error["message"], r.text
    assert error["message"].startswith(f"{param}: ")
    assert (len(store.thumbs()), len(store.arena_votes())) == before  # nothing stored


def test_feedback_needs_the_key(server, client, model):
    c = client.chat.completions.create(model=model, messages=USER, max_tokens=2)
    for key in (None, "wrong"):
        r = feedback(server, {"reply_id": c.id, "thumb": "up"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
