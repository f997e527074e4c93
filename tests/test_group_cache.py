"""Generation for rows in groups of one prompt (train/group_cache.py): each group's prompt prefilled once and its
keys and values kept once, sampling exactly what the plain cache samples, on tiny local models."""

from __future__ import annotations

import pytest
import torch

from rlhfchat.data.schema import message
from rlhfchat.decoding import GenerationSettings, encode_prompt, hf_generate, left_pad
from rlhfchat.models import load_tokenizer
from rlhfchat.train import group_cache
from rlhfchat.train.group_cache import group_size

SYSTEM = "You add numbers and write the sum."


def test_group_size_finds_consecutive_runs_of_one_prompt():
    a, b, c = [0, 5, 6], [7, 8, 9], [0, 5, 7]
    ids = torch.tensor([a, a, b, b, c, c])
    mask = (ids != 0).long()
    assert group_size(ids, mask) == 2
    assert group_size(ids[:4], mask[:4]) == 2
    assert group_size(torch.tensor([a, a, a, b, b, b]), (torch.tensor([a, a, a, b, b, b]) != 0).long()) == 3
    assert group_size(torch.tensor([a, a, a, b]), (torch.tensor([a, a, a, b]) != 0).long()) == 1  # 4 % 3
    assert group_size(torch.tensor([a, a, b, c]), (torch.tensor([a, a, b, c]) != 0).long()) == 1  # b, c differ
    assert group_size(torch.tensor([a, b]), (torch.tensor([a, b]) != 0).long()) == 1
    same = torch.tensor([a, a])
    assert group_size(same, torch.tensor([[0, 1, 1], [1, 1, 1]])) == 1  # the same ids under another mask


def _model(tiny_model_dir, tmp_path, arch):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = load_tokenizer(tiny_model_dir)
    if arch == "llama":
        return tok, AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    if arch == "llama-gqa":  # two query heads per key/value head
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / arch)
    return tok, AutoModelForCausalLM.from_pretrained(tmp_path / arch)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "gpt2"])
@pytest.mark.parametrize("system", [True, False])
def test_grouped_generation_samples_what_the_plain_cache_samples(tiny_model_dir, tmp_path, monkeypatch, arch, system):
    """4 prompts of different lengths (left padding), 3 samples each: the same tokens and captured hidden states as
    with the plain cache; the prompts' prefill runs on 4 rows (with a shared system prompt: after its own one-row
    prefill), and every layer of the cache holds 4 rows of prompt keys."""
    tok, model = _model(tiny_model_dir, tmp_path, arch)
    system_turn = [message("system", SYSTEM)] if system else []
    prompts = [system_turn + [message("user", f"What is {a} + {a}?" + " Please." * a)] for a in range(4)]
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts for _ in range(3)], tok.pad_token_id)
    assert group_size(ids, mask) == 3 and mask[:, 0].tolist().count(0) >= 3  # some rows padded
    made = []
    prefill = group_cache.grouped_prefill

    def recorded(*args, **kwargs):
        made.append(prefill(*args, **kwargs))
        return made[-1]

    out = {}
    for grouped in (False, True):
        monkeypatch.setattr(group_cache, "group_size", group_size if grouped else lambda *a: 1)
        monkeypatch.setattr(group_cache, "grouped_prefill", recorded)
        calls: list[int] = []
        hook = model.base_model.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
        settings = GenerationSettings(max_new_tokens=6, min_new_tokens=6)
        out[grouped, True] = hf_generate(model, tok, ids, mask, settings, capture=True, seeds=list(range(12)))
        hook.remove()
        settings = GenerationSettings(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out[grouped, False] = hf_generate(model, tok, ids, mask, settings, capture=True)
        if grouped:  # [the shared prefix on 1 row,] the rest of the prompts on 4, then each step on 12
            first = calls.index(4)
            assert calls[:first] in ([], [1]) and calls[first + 1 :] == [12] * 6
            assert calls[:first] == [1] or not system
        else:
            assert 4 not in calls
    assert len(made) == 2  # one grouped cache per grouped call
    cache, rows_ids, _ = made[0]
    for layer in cache.layers:  # the prompts' keys once per group, the rows' own after them
        assert layer.prompt[0].shape[:3] == (4, 2, rows_ids.shape[1] - 1)  # 2 key/value heads in all three models
        assert layer.keys.shape[:3] == (12, 2, 6)  # the last prompt column, 5 of the 6 new
    for do_sample in (True, False):
        plain, grouped = out[False, do_sample], out[True, do_sample]
        assert torch.equal(plain.tokens, grouped.tokens)
        assert torch.allclose(plain.hidden, grouped.hidden, atol=1e-5)
    assert not torch.equal(out[True, True].tokens[0], out[True, True].tokens[1])  # a group's samples differ


def test_the_grouped_cache_refuses_edits_and_the_trunk_is_left_as_it_was(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhfchat.errors import RlhfchatError
    from rlhfchat.train.group_cache import GROUPED, groupable, grouped_attention, grouped_prefill

    from rlhfchat.decoding import _new_cache, grouped_cache

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert groupable(model.model, _new_cache(model))
    ids, mask = left_pad([encode_prompt(tok, [message("user", "Hi there")])] * 2, tok.pad_token_id)
    with torch.no_grad():
        prefilled, _, _ = grouped_prefill(model.model, ids, mask, 2, True, _new_cache(model))
        cache = grouped_cache(prefilled, 2, 3)
    with pytest.raises(RlhfchatError, match="sampling and greedy decoding only"):
        cache.layers[0].batch_repeat_interleave(2)
    with grouped_attention(model.model, cache):
        assert model.config._attn_implementation == GROUPED
    assert model.config._attn_implementation == "sdpa"
    assert GROUPED not in ALL_ATTENTION_FUNCTIONS and GROUPED not in ALL_MASK_ATTENTION_FUNCTIONS
    model.config._attn_implementation = "eager"
    assert groupable(model.model, _new_cache(model))
    model.config.sliding_window = 4
    assert not groupable(model.model, _new_cache(model))


def test_a_hybrid_models_repeated_prompts_generate_from_the_plain_cache():
    """LFM2's convolution blocks keep no keys and values: its cache is not only dynamic layers, so repeated prompts
    take the plain cache (they crashed in the grouped prefill) and sample as unrepeated ones do."""
    from transformers import AutoModelForCausalLM, Lfm2Config

    from rlhfchat.decoding import _new_cache
    from rlhfchat.train.group_cache import groupable
    from rlhfchat.train.trunk import causal_parts

    class Tok:
        eos_token_id, pad_token_id = 3, 0

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Lfm2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, layer_types=["conv", "full_attention", "conv", "full_attention"]))
    assert not groupable(causal_parts(model)[0], _new_cache(model))
    ids, mask = left_pad([[5, 6, 7, 8]] * 2 + [[9, 10, 11]] * 2, 0)
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    repeated = hf_generate(model, Tok(), ids, mask, settings).tokens
    once = hf_generate(model, Tok(), ids[::2], mask[::2], settings).tokens
    assert torch.equal(repeated[::2], once) and torch.equal(repeated[1::2], once)
