"""A model's own chat template is kept and trained on: ChatML, Llama 3 and Mistral templates on tokenizers built
locally (written from their documented formats), beside Vicuna v0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfchat.data.chat_format import (CHAT_TEMPLATE, assistant_token_mask, choose_template, has_generation_markers,
                                       template_stops)
from rlhfchat.errors import RlhfchatError
from tests.conftest import CORPUS

# ChatML as Qwen2.5-Instruct documents it (without its default system prompt)
CHATML = ("{%- for message in messages -%}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
# Llama 3 Instruct: a header per turn, contents trimmed, <|eot_id|> ends every turn
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Mistral Instruct v0.1: [INST] ... [/INST] in plain text, the reply ends with EOS
MISTRAL = ("{{ bos_token }}{%- for message in messages %}"
           "{%- if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{%- endif %}"
           "{%- endfor %}")

CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "4 + 4 = 8."}]


def _tokenizer(kind: str):
    from rlhfchat.tiny import train_tokenizer

    tok = train_tokenizer(CORPUS, 300)
    if kind == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    elif kind == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        tok.chat_template = LLAMA3
    elif kind == "mistral":
        tok.chat_template = MISTRAL
    return tok


def _masked_text(tok, ids, mask) -> list[str]:
    """The masked tokens decoded, one string per contiguous run."""
    runs, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("kind, want", [
    ("chatml", ["2 + 3 = 5.<|im_end|>", "4 + 4 = 8.<|im_end|>"]),
    ("llama3", ["2 + 3 = 5.<|eot_id|>", "4 + 4 = 8.<|eot_id|>"]),
    ("mistral", ["2 + 3 = 5.</s>", "4 + 4 = 8.</s>"]),
])
def test_assistant_tokens_are_found_by_rendering(kind, want):
    tok = _tokenizer(kind)
    assert not has_generation_markers(tok.chat_template)
    ids, mask = assistant_token_mask(tok, CONVERSATION)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert _masked_text(tok, ids, mask) == want


def test_rendering_gives_the_mask_generation_markers_give():
    tok = _tokenizer("vicuna")  # train_tokenizer sets Vicuna v0, which has {% generation %} markers
    assert tok.chat_template == CHAT_TEMPLATE and has_generation_markers(tok.chat_template)
    out = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = assistant_token_mask(tok, CONVERSATION)
    assert (ids, mask) == (out["input_ids"], out["assistant_masks"])


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = _tokenizer("chatml")
    # numbers the turns from the end: rendering one more message changes everything before it
    tok.chat_template = ("{%- for m in messages -%}{{ (messages|length - loop.index)|string + m['content'] }}"
                         "{%- endfor -%}")
    with pytest.raises(RlhfchatError, match=r"messages\[1\] changes the text before it"):
        assistant_token_mask(tok, CONVERSATION)


@pytest.mark.parametrize("kind, tokens, strings", [
    ("chatml", ["</s>", "<|im_end|>"], []),
    ("llama3", ["<|eot_id|>"], []),
    ("mistral", ["</s>"], ["[INST]"]),
    ("vicuna", ["</s>"], ["### Human:"]),
])
def test_stops_come_from_the_template(kind, tokens, strings):
    tok = _tokenizer(kind)
    stops = template_stops(tok)
    assert tok.convert_ids_to_tokens(stops.token_ids) == tokens
    assert stops.strings == strings


def test_a_model_folder_keeps_its_own_template(tmp_path):
    """The bug: every template without {% generation %} markers was replaced by Vicuna v0 on load."""
    from rlhfchat.models import load_tokenizer

    _tokenizer("chatml").save_pretrained(tmp_path / "m")
    assert load_tokenizer(tmp_path / "m").chat_template == CHATML
    assert load_tokenizer(tmp_path / "m", "vicuna_v0").chat_template == CHAT_TEMPLATE
    (tmp_path / "t.jinja").write_text(MISTRAL)
    assert load_tokenizer(tmp_path / "m", str(tmp_path / "t.jinja")).chat_template == MISTRAL
    with pytest.raises(RlhfchatError, match="base.chat_template: expected model, vicuna_v0 or a Jinja template file"):
        load_tokenizer(tmp_path / "m", "chatml")
    bare = _tokenizer("chatml")
    bare.chat_template = None
    assert choose_template(bare, "model").chat_template == CHAT_TEMPLATE  # no template of its own: Vicuna v0


def test_sft_masks_by_rendering_or_leaves_it_to_trl():
    import datasets

    from rlhfchat.train.sft import assistant_loss_dataset

    ds = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    tok = _tokenizer("chatml")
    out, trl_masks = assistant_loss_dataset(ds, tok)
    assert not trl_masks and out.column_names == ["input_ids", "assistant_masks"]
    assert out[0]["assistant_masks"] == assistant_token_mask(tok, CONVERSATION)[1]
    # a template TRL ships a training version of (Llama 3's own, from TRL's package) and one with markers: TRL's
    import trl

    llama3 = _tokenizer("llama3")
    llama3.chat_template = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text()
    assert assistant_loss_dataset(ds, llama3) == (ds, True)
    assert assistant_loss_dataset(ds, _tokenizer("vicuna")) == (ds, True)


@pytest.mark.slow
def test_sft_trains_on_a_chatml_model_and_keeps_its_template(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhfchat.models import load_tokenizer
    from rlhfchat.train import sft
    from tests.test_stages import _write_data, recipe

    tok = _tokenizer("chatml")
    base = tmp_path / "chatml-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    run = tmp_path / "run"
    _write_data(run / "data")
    sft.main(recipe(run, f"base.model={base}"))
    assert load_tokenizer(run / "sft").chat_template == CHATML
    losses = [json.loads(x)["loss"] for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) >= 3 and losses[-1] < losses[0]  # it learns the replies (only they carry the loss)
    assert AutoModelForCausalLM.from_pretrained(run / "sft").config.vocab_size == len(tok)


def test_the_chat_engine_ends_a_reply_at_the_templates_end_of_turn_token(tmp_path, monkeypatch):
    """ChatML's <|im_end|> is not the tokenizer's EOS: the engine still ends the reply there (decoding.end_token_ids),
    instead of writing on into the next turn."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfchat.chat.engine import ChatEngine, SamplingParams

    tok = _tokenizer("chatml")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = ChatEngine(tmp_path / "m", name="chatml")
    try:
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert im_end != tok.eos_token_id and im_end in engine.eos_ids
        script = tok("2 + 3 = 5.", add_special_tokens=False)["input_ids"] + [im_end] + tok(
            "<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]
        monkeypatch.setattr(engine, "_sample", lambda logits, rows: [script[len(r.tokens)] for r in rows])
        c = engine.generate([{"role": "user", "content": "What is 2 + 3?"}],
                            SamplingParams(temperature=0, max_new_tokens=40))
        assert (c.text, c.finish_reason) == ("2 + 3 = 5.", "stop")
    finally:
        engine.close()
