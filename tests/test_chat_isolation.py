"""One request never harms another inside the engine: a setting it cannot sample with is refused at submit, and a
failure that belongs to one request (NaN scores in its row, a prefill that raises) fails it alone, while bystander
streams go on decoding in the same batch. The last test fuzzes the settings with hypothesis.

The bystanders decode greedily on a 4096-position copy of the tiny model: greedy never meets EOS on its random
weights, so they are still streaming when every hostile request arrives, joins their batch and ends.
"""

from __future__ import annotations

import math
import threading

import pytest
from _chat_server import long_context_copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfchat.chat.engine import ChatEngine, PromptTooLong, SamplingParams
from rlhfchat.chat.request import chars_per_token_bound
from rlhfchat.errors import RlhfchatError

Q = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    e = ChatEngine(long_context_copy(tiny_model_dir, tmp_path_factory.mktemp("long") / "long"), max_batch=16,
                   max_queue=16)
    yield e
    e.close()


class Bystanders:
    """`n` greedy streams, each read by its own thread, that must end only when `finish` cancels them."""

    def __init__(self, engine: ChatEngine, n: int = 4):
        self.reqs = [engine.submit([{"role": "user", "content": f"Tell me about {i}."}],
                                   SamplingParams(temperature=0, max_new_tokens=3900)) for i in range(n)]
        self.pieces: list[list[str]] = [[] for _ in range(n)]
        self.errors: list[BaseException | None] = [None] * n
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        for p in self.pieces:  # all of them decoding before the test goes on
            _wait_for(lambda: len(p) > 0)

    def _read(self, i: int) -> None:
        try:
            for piece in self.reqs[i]:
                self.pieces[i].append(piece)
        except BaseException as e:  # noqa: BLE001 - recorded: the test asserts there is none
            self.errors[i] = e

    def assert_unharmed(self) -> None:
        assert self.errors == [None] * len(self.reqs), self.errors
        assert not any(r.done for r in self.reqs), "a bystander ended before the test did"

    def finish(self) -> list[int]:
        """Cancel them; each must end as cancelled (not failed); returns how many pieces each streamed."""
        self.assert_unharmed()
        for r in self.reqs:
            r.cancel()
        for t in self.threads:
            t.join(timeout=60)
        assert self.errors == [None] * len(self.reqs), self.errors
        assert [r.result().finish_reason for r in self.reqs] == ["cancelled"] * len(self.reqs)
        return [len(p) for p in self.pieces]


def _wait_for(cond, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -2**63 - 1), ("seed", True), ("seed", 1.5),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1), ("temperature", True),
    ("top_p", math.nan), ("top_p", 0), ("top_k", -1), ("top_k", True), ("max_new_tokens", True),
    ("repetition_penalty", 1e-300), ("repetition_penalty", math.inf), ("repetition_penalty", math.nan),
    ("stop", ["a\ud800"]), ("stop", [""]), ("ignore_eos", "yes"),
])
def test_a_setting_the_engine_cannot_sample_with_is_refused_at_submit(engine, field, value):
    with pytest.raises(RlhfchatError, match=rf"^{field}(\[0\])?: "):
        SamplingParams(**{field: value})
    params = SamplingParams(max_new_tokens=2)
    setattr(params, field, value)  # changed after it was checked: submit checks again, before the batch
    with pytest.raises(RlhfchatError, match=rf"^{field}(\[0\])?: "):
        engine.submit(Q, params)


def test_the_seed_range_is_torchs(engine):
    for seed in (2**64 - 1, -2**63, 0):
        c = engine.generate(Q, SamplingParams(temperature=1.0, seed=seed, max_new_tokens=4, ignore_eos=True))
        assert c.completion_tokens == 4
    with pytest.raises(RlhfchatError, match=r"^messages\[0\]\.content: not valid Unicode"):
        engine.submit([{"role": "user", "content": "a\ud800"}])


def test_a_hostile_request_fails_alone_while_bystanders_stream(engine, monkeypatch):
    by = Bystanders(engine)

    # 1. a seed torch refuses, set after the settings were checked: refused at submit, not in the batched step
    bad = SamplingParams(max_new_tokens=4)
    bad.seed = 2**64
    with pytest.raises(RlhfchatError, match="^seed: "):
        engine.submit(Q, bad)
    by.assert_unharmed()

    # 2. a temperature so small that the scaled scores overflow: it samples (close to greedy) instead of NaN
    tiny_t = engine.generate(Q, SamplingParams(temperature=1e-300, max_new_tokens=6, ignore_eos=True))
    assert tiny_t.text == engine.generate(Q, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)).text
    by.assert_unharmed()

    # 3. the model gives NaN scores for one request's row (as an fp16 overflow would): in its prefill, or in the
    # running batch at its third token
    forward, poison = engine._forward, engine.encode([{"role": "user", "content": "poison"}])
    late: list = []

    def poisoned(input_ids, mask, pos, cache):
        logits, cache = forward(input_ids, mask, pos, cache)
        if input_ids.shape[1] > 1:  # a prefill: (n, L) left-padded prompts
            for i in range(input_ids.shape[0]):
                if input_ids[i, mask[i].bool()].tolist() == poison:
                    logits[i] = float("nan")
        else:  # a decoding step of the running batch, its rows in engine._rows
            for i, row in enumerate(engine._rows):
                if row.req in late and len(row.tokens) >= 2:
                    logits[i] = float("nan")
        return logits, cache

    monkeypatch.setattr(engine, "_forward", poisoned)
    sick = engine.submit([{"role": "user", "content": "poison"}], SamplingParams(temperature=0, max_new_tokens=4))
    late.append(engine.submit(Q, SamplingParams(temperature=0.5, max_new_tokens=8, ignore_eos=True)))
    well = engine.submit(Q, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    for r in (sick, late[0]):
        with pytest.raises(RlhfchatError, match="generation failed .*NaN"):
            r.result(timeout=60)
    assert well.result(timeout=60).completion_tokens == 4
    by.assert_unharmed()

    # 4. a prefill that raises for one prompt: the requests prefilled with it are retried alone; only it fails
    def failing(input_ids, mask, pos, cache):
        if input_ids.shape[1] > 1 and any(input_ids[i, mask[i].bool()].tolist() == poison
                                          for i in range(input_ids.shape[0])):
            raise RuntimeError("out of memory (simulated)")
        return forward(input_ids, mask, pos, cache)

    monkeypatch.setattr(engine, "_forward", failing)
    with engine._cond:  # queued together, so that one prefill takes both
        sick = engine.submit([{"role": "user", "content": "poison"}], SamplingParams(max_new_tokens=4))
        well = engine.submit(Q, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    with pytest.raises(RlhfchatError, match="generation failed .*out of memory"):
        sick.result(timeout=60)
    assert well.result(timeout=60).completion_tokens == 4
    monkeypatch.setattr(engine, "_forward", forward)
    assert min(by.finish()) > 0


def test_a_prompt_certainly_too_long_is_refused_without_tokenizing(engine, monkeypatch):
    bound = chars_per_token_bound(engine.tokenizer)
    assert bound == max(len(t) for t in engine.tokenizer.get_vocab())  # byte-level BPE, no normalizer
    calls = []
    tokenize = type(engine.tokenizer).__call__
    monkeypatch.setattr(type(engine.tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or tokenize(
        self, *a, **k))
    with pytest.raises(PromptTooLong, match=r"^messages: the prompt is more than 4096 tokens"):
        engine.submit([{"role": "user", "content": "x" * 1_000_000}], truncate=False)
    assert calls == []
    engine.submit([{"role": "user", "content": "x" * 100}], SamplingParams(max_new_tokens=1)).result(timeout=60)
    assert calls == [1]  # a prompt that may fit is tokenized, as before


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.text(st.characters(codec="utf-8") | st.sampled_from("\u0301\uac00\u1100\u1161\U0001f600 \n"),
               max_size=200))
def test_the_character_bound_holds_for_any_text(engine, text):
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(text) <= len(ids) * engine.chars_per_token


def test_the_character_bound_is_none_for_tokenizers_that_can_drop_characters():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def fast(pre, normalizer=None, **bpe):
        vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "\u2581a": 257, "\u2581": 258, "a": 259}
        tok = Tokenizer(models.BPE(vocab, [("\u2581", "a")], unk_token="<unk>", **bpe))
        tok.pre_tokenizer, tok.normalizer = pre, normalizer
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    llama2 = fast(pre_tokenizers.Metaspace(), normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]), byte_fallback=True)
    assert chars_per_token_bound(llama2) == 6  # "<0x41>": the longest entry
    for text in ("a a a", "日本語 \U0001f600", "x" * 50):
        assert len(text) <= len(llama2(text)["input_ids"]) * 6
    assert chars_per_token_bound(fast(pre_tokenizers.Whitespace(), byte_fallback=True)) is None  # drops spaces
    assert chars_per_token_bound(fast(pre_tokenizers.Metaspace())) is None  # unknown characters: one <unk> each
    assert chars_per_token_bound(fast(pre_tokenizers.Metaspace(), normalizers.Strip(), byte_fallback=True)) is None


VALID = {
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-300, 5e-324, 100.0]),
    "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, 400), "max_new_tokens": st.integers(1, 6),
    "repetition_penalty": st.floats(0.01, 100), "seed": st.integers(-2**63, 2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "ignore_eos": st.booleans(),
}
FIELDS = tuple(VALID)
HOSTILE = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4)
           | st.sampled_from([2**64, -2**63 - 1, 1e-300, 5e-324, -0.0, 1e308, 0.0099, 100.5])
           | st.lists(st.text(max_size=3) | st.sampled_from(["\ud800", "#", "\n"]), max_size=3))
FUZZED = {"requests": 0, "refused": 0, "answered": 0, "bystander_pieces": []}


def test_fuzzed_settings_never_harm_bystanders(engine):
    """Hypothesis draws every sampling setting from hostile values (NaN, infinities, subnormals, bools, seeds just
    past torch's range, strings, lone surrogates) and sends each request into the running batch; each is refused
    with the field named, or answered; the bystanders stream on untouched."""
    by = Bystanders(engine)

    @settings(max_examples=150, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({}, optional=VALID), st.dictionaries(st.sampled_from(FIELDS), HOSTILE, max_size=2),
           st.text(max_size=30) | st.sampled_from(["a\ud800", "\udfff", "### Human:", ""]))
    def one(valid: dict, hostile: dict, content: str) -> None:
        FUZZED["requests"] += 1
        try:
            params = SamplingParams(**{**valid, **hostile})
            if params.max_new_tokens is None or params.max_new_tokens > 6:
                params.max_new_tokens = 6  # a short reply: the point is joining the batch, not its length
            req = engine.submit([{"role": "user", "content": content}], params)
        except RlhfchatError as e:
            assert str(e).split(":")[0].split("[")[0] in (*FIELDS, "messages"), e
            FUZZED["refused"] += 1
            return
        c = req.result(timeout=60)
        assert c.finish_reason in ("stop", "length") and c.completion_tokens <= 6
        FUZZED["answered"] += 1
        by.assert_unharmed()

    one()
    FUZZED["bystander_pieces"] = by.finish()
    assert FUZZED["answered"] > 20 and FUZZED["refused"] > 20, FUZZED  # both sides were exercised
    print(f"\nfuzzed {FUZZED['requests']} requests ({FUZZED['refused']} refused, {FUZZED['answered']} answered); "
          f"{len(by.reqs)} of {len(by.reqs)} bystanders unharmed, {sum(FUZZED['bystander_pieces'])} pieces streamed")


def test_the_vllm_backend_shares_the_prompt_checks(engine):
    """VLLMEngine (GPU only) takes its prompt handling from ChatEngine: run it on this machine without vLLM."""
    from rlhfchat.chat.engine_vllm import VLLMEngine

    v = object.__new__(VLLMEngine)  # no vLLM here: only what fit() uses
    v.tokenizer, v.context_window, v.name = engine.tokenizer, engine.context_window, "vllm"
    v.chars_per_token = chars_per_token_bound(engine.tokenizer)
    assert v.fit(Q) == engine.fit(Q)
    with pytest.raises(PromptTooLong, match="more than 4096 tokens"):
        v.fit([{"role": "user", "content": "x" * 1_000_000}], truncate=False)
    with pytest.raises(RlhfchatError, match=r"^messages\[0\]\.content: not valid Unicode"):
        v.fit([{"role": "user", "content": "\ud800"}])
