"""The chat engine on the tiny random model: stop sequences, truncation, sampling settings, batching, busy."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from rlhfchat.chat.engine import (
    ChatEngine, EngineBusy, PromptTooLong, Request, SamplingParams, check_messages, load_engine, stream_safe,
)
from rlhfchat.data.chat_format import HUMAN
from rlhfchat.errors import RlhfchatError

Q = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Write a function that doubles a number."}]
Q3 = [{"role": "user", "content": "Fix the grammar: she go to school."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = ChatEngine(tiny_model_dir, max_batch=8, max_queue=16)
    yield e
    e.close()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def hf_greedy(engine, messages, n, **kw) -> str:
    """The reference: transformers' own generate, EOS switched off, decoded like the engine does."""
    import copy

    import torch

    cfg = copy.deepcopy(engine.model.generation_config)
    cfg.eos_token_id = None
    ids = torch.tensor([engine.encode(messages)])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg, max_new_tokens=n,
                                do_sample=False, **kw)
    return engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lstrip()


# ---------------------------------------------------------------- pure pieces

def test_stream_safe_holds_back_any_start_of_a_stop_sequence():
    stops = [HUMAN]
    assert stream_safe("The answer is 5.", stops) == "The answer is 5."
    assert stream_safe("The answer is 5.\n#", stops) == "The answer is 5."
    assert stream_safe("The answer is 5.\n### Hum", stops) == "The answer is 5."
    assert stream_safe("x = a ##", stops) == "x = a"  # might still become "x = a ### Human:"
    assert stream_safe("x = a ## comment", stops) == "x = a ## comment"  # can no longer
    assert stream_safe("caf\ufffd", stops) == "caf"  # an incomplete UTF-8 character waits for its next byte
    assert stream_safe("trailing   ", stops) == "trailing"


def test_sampling_params_and_messages_are_checked_with_the_field_named():
    with pytest.raises(RlhfchatError, match="^temperature:"):
        SamplingParams(temperature=-1)
    with pytest.raises(RlhfchatError, match="^top_p:"):
        SamplingParams(top_p=0)
    with pytest.raises(RlhfchatError, match="^max_new_tokens:"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(RlhfchatError, match=r"^messages\[1\]\.role: a system message may only come first"):
        check_messages([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                        {"role": "user", "content": "c"}])
    with pytest.raises(RlhfchatError, match=r"^messages\[1\]\.role: the last message must be the user's"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


# ---------------------------------------------------------------- generation

def test_greedy_matches_transformers_generate(engine):
    c = engine.generate(Q, greedy(24, ignore_eos=True))
    assert c.finish_reason == "length" and c.completion_tokens == 24
    assert c.text == stream_safe(hf_greedy(engine, Q, 24), [])
    assert c.prompt_tokens == len(engine.encode(Q)) and c.messages == Q and c.ttft_s > 0


def test_repetition_penalty_matches_transformers(engine):
    with_penalty = engine.generate(Q2, greedy(24, ignore_eos=True, repetition_penalty=1.8)).text
    assert with_penalty == stream_safe(hf_greedy(engine, Q2, 24, repetition_penalty=1.8), [])
    assert with_penalty != engine.generate(Q2, greedy(24, ignore_eos=True)).text


def test_sampling_settings(engine):
    def sample(**kw):
        return engine.generate(Q, SamplingParams(max_new_tokens=20, ignore_eos=True, **kw)).text

    greedy_text = engine.generate(Q, greedy(20, ignore_eos=True)).text
    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)  # a seed reproduces the reply
    assert len({sample(temperature=1.5, seed=s) for s in range(4)}) > 1  # and different seeds differ
    assert sample(temperature=1.5, top_k=1, seed=3) == greedy_text  # top_k 1 leaves only the argmax
    assert sample(temperature=1.5, top_p=1e-6, seed=3) == greedy_text  # so does a tiny top_p
    c = engine.generate(Q, SamplingParams(temperature=1.0, max_new_tokens=5, ignore_eos=True, seed=1))
    assert c.completion_tokens == 5 and c.finish_reason == "length"


def test_the_engine_samples_through_the_decoding_core(engine):
    """The engine's distribution for a row is decoding.warp's for the same settings (after the repetition penalty on
    the row's seen tokens), and its draw is decoding.draw's with the same seeded generator."""
    import torch

    from rlhfchat.chat.engine import _Row
    from rlhfchat.decoding import draw, warp

    torch.manual_seed(0)
    v = engine.vocab_size
    logits = torch.randn(3, v) * 4
    settings = [dict(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3),
                dict(temperature=1.5, top_k=0, top_p=0.5, repetition_penalty=1.0),
                dict(temperature=1.0, top_k=40, top_p=1.0, repetition_penalty=0.8)]
    seen = torch.zeros(3, v, dtype=torch.bool)
    seen[:, logits[0].topk(3).indices] = True  # the best tokens were seen: the penalty moves them
    rows = [_Row(Request([], SamplingParams(seed=i, **kw), [], "m", 1), torch.Generator().manual_seed(i), seen[i], [])
            for i, kw in enumerate(settings)]
    penalized = engine._penalized(logits, rows)
    expected, order = warp(logits, [s["temperature"] for s in settings], [s["top_k"] for s in settings],
                           [s["top_p"] for s in settings], [s["repetition_penalty"] for s in settings], seen)
    got, got_order = warp(penalized, [s["temperature"] for s in settings], [s["top_k"] for s in settings],
                          [s["top_p"] for s in settings])
    assert torch.equal(got_order, order) and torch.equal(got.softmax(-1), expected.softmax(-1))
    best = int(logits[0].argmax())  # positive (the best of 8k draws at scale 4): divided by the penalty
    assert penalized[0, best] == logits[0, best] / 1.3 and torch.equal(penalized[1], logits[1])
    # by hand, row 0: its top-5 after the penalty, renormalised; top_p 0.9 keeps what is needed to reach 0.9
    probs = expected.softmax(-1)
    assert int((probs[0] > 0).sum()) <= 5 and int((probs[2] > 0).sum()) == 40
    sampled = engine._sample(logits.clone(), rows)
    core = draw(expected, order, [torch.Generator().manual_seed(i) for i in range(3)], dtype=torch.float32).tolist()
    assert sampled == core


@pytest.mark.parametrize("room", [None, 5])
def test_batched_requests_decode_as_they_would_alone(engine, monkeypatch, room):
    if room:  # the batch's reserved KV room runs out every few tokens and is moved to a larger buffer
        monkeypatch.setattr("rlhfchat.chat.engine.DECODE_ROOM", room)
    alone = [engine.generate(m, greedy(30, ignore_eos=True)).text for m in (Q, Q2, Q3)]
    assert alone[0] == stream_safe(hf_greedy(engine, Q, 30), [])  # and transformers' own cache agrees
    # all at once: one left-padded batch
    reqs = [engine.submit(m, greedy(30, ignore_eos=True)) for m in (Q, Q2, Q3)]
    assert [r.result().text for r in reqs] == alone
    # continuous batching: Q2 and Q3 join while Q is half-way through its reply
    first = engine.submit(Q, greedy(60, ignore_eos=True))
    it = iter(first)
    next(it)
    late = [engine.submit(m, greedy(30, ignore_eos=True)) for m in (Q2, Q3)]
    assert [r.result().text for r in late] == alone[1:]
    assert first.result().text.startswith(alone[0])


def test_streamed_pieces_add_up_to_the_reply_sync_and_async(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=5)
    pieces = list(engine.stream(Q, params))
    assert "".join(pieces) == engine.generate(Q, params).text

    async def collect():
        req = engine.submit(Q, params)
        return [p async for p in req], req.completion.text

    apieces, text = asyncio.run(collect())
    assert "".join(apieces) == text == "".join(pieces)


def scripted(engine, monkeypatch, replies: dict[str, str], eos_after: set[str] = frozenset()):
    """Make the engine 'generate' fixed text per prompt (keyed by the last user message), through the real
    batching, streaming and stop handling: only the choice of token is replaced."""
    tok = engine.tokenizer
    scripts = {k: tok(v, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if k in eos_after else [])
               for k, v in replies.items()}

    def sample(logits, rows):
        return [scripts[r.req.messages[-1]["content"]][len(r.tokens)] for r in rows]

    monkeypatch.setattr(engine, "_sample", sample)


def test_replies_stop_at_the_template_stop_sequence_and_never_leak_it(engine, monkeypatch):
    replies = {
        "a": " The answer is 5.\n### Human: and now I speak for the user",
        "b": " Sure.\n### Hum",  # cut off by max_new_tokens inside the stop sequence
        "c": " Done.",  # ends with EOS
        "d": " one END two",  # an extra stop sequence from the request
    }
    scripted(engine, monkeypatch, replies, eos_after={"c"})
    n_b = len(engine.tokenizer(replies["b"], add_special_tokens=False)["input_ids"])
    settings = {"a": greedy(200), "b": greedy(n_b), "c": greedy(200), "d": greedy(200, stop=["END"])}
    reqs = {k: engine.submit([{"role": "user", "content": k}], p) for k, p in settings.items()}
    streamed = {k: list(r) for k, r in reqs.items()}
    results = {k: r.result() for k, r in reqs.items()}
    assert {k: c.text for k, c in results.items()} == {"a": "The answer is 5.", "b": "Sure.", "c": "Done.",
                                                       "d": "one"}
    assert {k: c.finish_reason for k, c in results.items()} == {"a": "stop", "b": "length", "c": "stop",
                                                                "d": "stop"}
    for k, pieces in streamed.items():
        assert "".join(pieces) == results[k].text
        assert not any("#" in p for p in pieces), pieces  # not even the first character of "### Human:"


def test_oldest_turns_are_dropped_to_fit_and_the_system_prompt_kept(engine):
    system = {"role": "system", "content": "You are helpful."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question {i}: what is {i} + {i}? " * 2},
                  {"role": "assistant", "content": f"The answer is {2 * i}. " * 3}]
    messages = [system, *turns, {"role": "user", "content": "And the last question?"}]
    assert len(engine.encode(messages)) > engine.context_window  # too long as it is
    used, ids, budget = engine.fit(messages, max_new_tokens=32)
    assert used[0] == system and used[-1] == messages[-1] and used[1]["role"] == "user"
    assert 3 <= len(used) < len(messages) and used[1:] == messages[len(messages) - len(used) + 1:]
    assert len(ids) + 32 <= engine.context_window and budget == 32
    c = engine.generate(messages, greedy(32))
    assert c.messages == used and c.prompt_tokens == len(ids)
    with pytest.raises(PromptTooLong, match="^messages: the prompt is"):
        engine.submit(messages, greedy(32), truncate=False)  # the API's way: no silent dropping
    with pytest.raises(PromptTooLong):
        engine.submit([{"role": "user", "content": "word " * 400}], greedy(8))  # one message too long


def test_a_full_queue_answers_busy_and_cancel_stops_a_reply(tiny_model_dir):
    small = ChatEngine(tiny_model_dir, max_batch=1, max_queue=1)
    try:
        first = small.submit(Q, greedy(200, ignore_eos=True))
        pieces = iter(first)  # (kept: closing the iterator would cancel the request)
        next(pieces)  # decoding now
        waiting = small.submit(Q, greedy(5))
        with pytest.raises(EngineBusy, match="busy"):
            small.submit(Q, greedy(5))
        first.cancel()
        c = first.result(timeout=30)
        assert c.finish_reason == "cancelled" and c.completion_tokens < 200
        assert waiting.result(timeout=30).finish_reason in ("stop", "length")
        # blocking submits wait for room instead of failing (evaluation's generate_many)
        done = small.generate_many([Q, Q2, Q3, Q], greedy(4))
        assert len(done) == 4 and [d.messages[-1] for d in done] == [Q[-1], Q2[-1], Q3[-1], Q[-1]]
    finally:
        small.close()
    with pytest.raises(RlhfchatError, match="closed"):
        small.submit(Q)


def test_concurrent_threads_all_get_replies(engine):
    results, errors = [], []

    def ask(i):
        try:
            results.append(engine.generate(Q if i % 2 else Q3, SamplingParams(max_new_tokens=12, seed=i)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12


def test_lora_adapter_folder_loads_on_its_base(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    e = load_engine(tmp_path / "adapter", backend="hf", name="lora")
    try:
        c = e.generate(Q, greedy(8, ignore_eos=True))
        assert c.model == "lora" and c.completion_tokens == 8
    finally:
        e.close()


def test_bench_generate_prints_one_json_line(tiny_model_dir, capsys):
    import torch

    from rlhfchat.cli import main as cli

    threads = str(torch.get_num_threads())  # (the bench sets torch's threads for the whole process)
    assert cli(["bench", "generate", str(tiny_model_dir), "--streams", "2", "--max-new-tokens", "4",
                "--rounds", "1", "--threads", threads]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    result = json.loads(line)
    assert result["bench"] == "generate" and result["concurrent"]["streams"] == 2
    assert result["single"]["tokens_per_s"] > 0 and result["concurrent"]["total_tokens_per_s"] > 0
    assert {"ttft_p50_s", "ttft_p95_s"} <= set(result["single"]) and result["speedup"] > 0
