"""Rollout generation: seeded per-row sampling, ZeRO-3 gathering's choice of branch, the vLLM backend's checks."""

from __future__ import annotations

import types

import pytest
import torch

from rlhfchat import decoding
from rlhfchat.decoding import GenerationSettings, SeededSampler, encode_prompt, reserve_cache, warp
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import load_tokenizer
from rlhfchat.train.distributed import gathered_for_generation
from rlhfchat.train.rollout import check_backend, generate_rollout

SHORT = [{"role": "user", "content": "What is 3 + 4?"}]
LONG = [{"role": "user", "content": "Write a function that doubles a number, then fix the grammar: she go to school."}]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _replies(lm, prompts, seeds, **settings):
    model, tok = lm
    ids = [encode_prompt(tok, p) for p in prompts]
    out = generate_rollout(model, tok, ids, GenerationSettings(max_new_tokens=12, stop_sequences=[], **settings),
                           seeds=seeds)
    # the tokens of each reply (mask 1), so two runs compare token for token
    return [row[m.bool()].tolist() for row, m in zip(out.response_ids, out.response_mask)]


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_seeded_reply_is_the_same_alone_and_inside_a_batch(lm, settings):
    torch.manual_seed(0)
    alone = _replies(lm, [SHORT], [7], **settings)[0]
    torch.manual_seed(123)  # the global RNG plays no part
    batch = _replies(lm, [LONG, SHORT, LONG], [1, 7, 2], **settings)
    assert batch[1] == alone  # same prompt and seed, other rows longer (so more left padding) around it
    assert len(alone) == 12, "the tiny random model rarely ends early; a 12-token reply compares 12 draws"
    others = [_replies(lm, [SHORT], [s], **settings)[0] for s in (8, 9, 10)]
    assert any(o != alone for o in others), "different seeds give different replies"


def test_seeded_sampling_keeps_min_new_tokens_and_eos(lm):
    model, tok = lm
    ids = [encode_prompt(tok, SHORT)]
    # EOS made the likeliest token by far: seeded sampling ends at once, unless min_new_tokens forbids it
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 50.0
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        free = generate_rollout(model, tok, ids, GenerationSettings(max_new_tokens=8, stop_sequences=[]), seeds=[3])
        held = generate_rollout(model, tok, ids, GenerationSettings(max_new_tokens=8, min_new_tokens=5,
                                                                    stop_sequences=[]), seeds=[3])
    finally:
        handle.remove()
    assert free.response_ids[0, 0] == tok.eos_token_id and int(free.response_mask.sum()) == 1 and bool(free.ended[0])
    assert int(held.response_mask.sum()) == 6 and held.response_ids[0, 5] == tok.eos_token_id
    assert tok.eos_token_id not in held.response_ids[0, :5].tolist()


def test_seeds_must_match_the_prompts(lm):
    model, tok = lm
    with pytest.raises(RlhfchatError, match="seeds"):
        generate_rollout(model, tok, [encode_prompt(tok, SHORT)] * 2, GenerationSettings(max_new_tokens=2), seeds=[1])


def test_seeded_sampler_draws_from_the_softmax():
    """the inverse-CDF pick is a sample from softmax(logits): frequencies over many draws match."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -torch.inf])
    probs = torch.softmax(logits, 0)
    n = 40_000
    sampler = SeededSampler(range(n))  # n rows, each its own seed: one draw each
    picks = sampler(None, logits.expand(n, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=6).double() / n
    # 4 standard errors at most (p(1-p)/n); the -inf token is never drawn
    assert torch.all((freq - probs.double()).abs() <= 4 * (probs * (1 - probs) / n).sqrt().double() + 1e-12), freq
    assert freq[5] == 0
    # one row advanced step by step draws from the same distribution too
    row = SeededSampler([5])
    seq = torch.stack([row(None, logits[None]).argmax(-1)[0] for _ in range(20_000)])
    freq = torch.bincount(seq, minlength=6).double() / 20_000
    assert torch.all((freq - probs.double()).abs() <= 4 * (probs * (1 - probs) / 20_000).sqrt().double() + 1e-12)


def test_seeded_sampler_refuses_rows_with_nothing_to_sample():
    ok = torch.tensor([0.0, 1.0, 2.0])
    for bad in (torch.tensor([0.0, torch.nan, 1.0]), torch.full((3,), -torch.inf)):
        with pytest.raises(RlhfchatError, match="NaN or all -inf"):
            SeededSampler([1, 2])(None, torch.stack([ok, bad]))
    # a row with one token left always takes it
    only = torch.tensor([[-torch.inf, 3.0, -torch.inf]]).expand(200, -1)
    assert SeededSampler(range(200))(None, only).argmax(-1).eq(1).all()


def test_the_seeded_sampler_warps_like_sampling():
    """Temperature, top-k and top-p come before the noise, in generate's order; top-k removes the rest for good."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    draws = set()
    for seed in range(200):
        x = SeededSampler([seed], GenerationSettings(temperature=0.5, top_k=2))(None, logits)
        draws.add(int(x.argmax()))
    assert draws == {0, 1}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 7, 0.6)])
def test_warp_gives_the_distribution_transformers_warpers_give(temperature, top_k, top_p):
    """decoding.warp (the engine's and the rollouts' one sampler) == transformers' Temperature -> TopK -> TopP."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    x, order = warp(logits, [temperature] * 4, [top_k] * 4, [top_p] * 4)
    ours = torch.zeros_like(logits).scatter_(1, order, x.softmax(-1)) if order is not None else x.softmax(-1)
    hf = logits.clone()
    for p in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
              + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
        hf = p(None, hf)
    torch.testing.assert_close(ours, hf.softmax(-1), rtol=1e-5, atol=1e-6)


def test_unseeded_sampling_follows_the_global_rng(lm):
    def replies(seed):
        torch.manual_seed(seed)
        return _replies(lm, [SHORT, LONG], None)

    assert replies(5) == replies(5)
    assert replies(5) != replies(6)


def test_reserved_cache_layer_returns_what_concatenation_would():
    from transformers import DynamicCache

    cache = reserve_cache(DynamicCache(), 3)  # layers appear as they are first updated: none to swap yet
    assert cache.layers == []
    stock, reserved = DynamicCache(), DynamicCache()
    for c in (stock, reserved):
        c.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)  # one layer, one position
    reserve_cache(reserved, 3)
    layer = reserved.layers[0]
    assert type(layer).__name__ == "ReservingLayer" and type(stock.layers[0]).__name__ == "DynamicLayer"
    g = torch.Generator().manual_seed(0)
    ptrs = set()
    for step, width in enumerate([2, 1, 1, 1, 4]):  # a prefill, then decode steps, then past the reserved room
        k, v = torch.randn(2, 1, width, 4, generator=g), torch.randn(2, 1, width, 4, generator=g)
        want, got = stock.update(k, v, 0), reserved.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == stock.get_seq_length()
        ptrs.add(layer.room[0].data_ptr())
        if step == 3:  # 1 + 2 + 1 + 1 + 1 positions: the room reserved at the prefill, filled exactly
            assert len(ptrs) == 1, "one buffer for the prefill and the steps that fit, not a new tensor per step"
    assert len(ptrs) == 2, "a new buffer once the room is used up"
    k = torch.randn(4, 1, 1, 4, generator=g)
    for c in (stock, reserved):  # a repeat replaces the keys from outside: the layer starts from them
        c.batch_repeat_interleave(2)
        c.update(k, -k, 0)
    assert reserved.layers[0].keys.shape == (4, 1, 11, 4)
    # and whatever else transformers does to a layer (crop, row selection, beam reorder), it returns what the
    # stock layer returns next
    for rows, op in ((4, lambda c: c.crop(-3)), (2, lambda c: c.batch_select_indices(torch.tensor([0, 2]))),
                     (2, lambda c: c.reorder_cache(torch.tensor([1, 0])))):
        k = torch.randn(rows, 1, 2, 4, generator=g)
        for c in (stock, reserved):
            op(c)
            c.update(k, -k, 0)
        assert torch.equal(reserved.layers[0].keys, stock.layers[0].keys)
        assert torch.equal(reserved.layers[0].values, stock.layers[0].values)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_generation_with_the_reserved_cache_matches_the_stock_cache(lm, monkeypatch, share_prefix):
    from rlhfchat.train.trunk import MIN_SHARED_PREFIX, shared_prefix_length

    model, tok = lm
    system = {"role": "system", "content": "You are a careful assistant. Answer briefly and check the arithmetic."}
    ids = [encode_prompt(tok, [system, *p]) for p in (SHORT, LONG, SHORT)]
    padded, mask = decoding.left_pad(ids, tok.pad_token_id)
    assert shared_prefix_length(padded, mask, padded.shape[1] - 1) >= MIN_SHARED_PREFIX  # the prefix is shared
    settings = GenerationSettings(max_new_tokens=10, min_new_tokens=10, stop_sequences=[], share_prefix=share_prefix)
    caches = []
    real = decoding.reserve_cache
    monkeypatch.setattr(decoding, "reserve_cache", lambda c, n: caches.append(real(c, n)) or caches[-1])
    fast = generate_rollout(model, tok, ids, settings, capture=True, seeds=[1, 2, 3])
    [cache] = caches
    for layer in cache.layers:  # one buffer from the prefill on: the 9 steps after it filled all but the last slot
        assert type(layer).__name__ == "ReservingLayer" and layer.keys.data_ptr() == layer.room[0].data_ptr()
        assert layer.room[0].shape[-2] - layer.keys.shape[-2] == 1
    monkeypatch.setattr(decoding, "reserve_cache", lambda c, n: c)  # generate's own concatenating cache
    stock = generate_rollout(model, tok, ids, settings, capture=True, seeds=[1, 2, 3])
    assert torch.equal(fast.response_ids, stock.response_ids)
    torch.testing.assert_close(fast.hidden, stock.hidden, rtol=0, atol=1e-5)


def _fake_accelerator(stage):
    plugin = None if stage is None else types.SimpleNamespace(zero_stage=stage)
    kind = types.SimpleNamespace(value="NO" if stage is None else "DEEPSPEED")
    return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), distributed_type=kind,
                                 unwrap_model=lambda m: m.module)


@pytest.mark.parametrize("stage", [None, 2])
def test_gathering_is_a_no_op_without_zero3(lm, stage):
    """ZeRO-2: accelerate's unwrap_model takes DeepSpeed's engine off; one process without DeepSpeed: no wrapper,
    and accelerate's unwrap_model (which imports deepspeed wherever it is installed) is not called."""
    model, _ = lm
    wrapper = model if stage is None else types.SimpleNamespace(module=model)  # what accelerate's prepare wraps
    with gathered_for_generation(wrapper, _fake_accelerator(stage)) as unwrapped:
        assert unwrapped is model


def test_gathering_with_a_real_accelerator_yields_the_unwrapped_model(lm):
    from accelerate import Accelerator

    model, _ = lm
    acc = Accelerator(cpu=True)
    with gathered_for_generation(model, acc) as unwrapped:
        assert unwrapped is model


def test_vllm_backend_needs_vllm_and_a_gpu(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(RlhfchatError, match=r"^ppo.rollout_backend: vllm is not installed"):
            check_backend("vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import sys

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # importable; the GPU check comes next
    with pytest.raises(RlhfchatError, match=r"^ppo.rollout_backend: vllm needs a CUDA GPU"):
        check_backend("vllm")


def test_vllm_weight_names_are_the_checkpoint_names_with_lora_merged(tiny_model_dir):
    """What sync_weights streams: the plain model's parameter names, LoRA's delta added to the base weights."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhfchat.train.rollout_vllm import vllm_weights

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm = get_peft_model(copy.deepcopy(plain), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))  # B != 0: a real delta
    expected = dict(copy.deepcopy(lm).merge_and_unload().named_parameters())
    streamed = dict(vllm_weights(lm))
    assert streamed.keys() == dict(plain.named_parameters()).keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(streamed[q], plain.get_parameter(q))
    assert all(torch.allclose(streamed[n], expected[n], atol=1e-7) for n in streamed)
    assert torch.equal(lm.get_base_model().get_parameter(q.replace("weight", "base_layer.weight")),
                       plain.get_parameter(q)), "the policy's own weights are left as they were"


def test_vllm_rollouts_fail_in_one_line_without_vllm():
    import importlib.util

    from rlhfchat.config import load_recipe
    from rlhfchat.train.rollout_vllm import VLLMRollouts

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: the engine itself is a GPU test")
    with pytest.raises(RlhfchatError, match=r"^ppo.rollout_backend: vllm is not installed"):
        VLLMRollouts("unused", load_recipe(None, ["ppo.rollout_backend=vllm"]).ppo, accelerator=None)
