"""The OpenAI-compatible API through the real `openai` client against a live `rlhfchat serve` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from _chat_server import running_server

KEY = "test-key-123"
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    # a small batch and queue, so that a burst finds the queue full
    with running_server([tiny_model_dir], work, "--max-batch", "4", "--max-queue", "4", "--db",
                        str(work / "feedback.db"), env={"RLHFCHAT_API_KEY": KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_and_health(server, client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]
    health = httpx.get(f"{server}/health").json()  # no key needed
    assert health["status"] == "ok" and tiny_model_dir.name in health["models"]


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
