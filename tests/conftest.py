"""Shared fixtures: tiny models built locally (random-init Llama, a tokenizer trained on a few lines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = [
    f"### Human: What is {a} + {b}?\n### Assistant: {a} + {b} = {a + b}. The answer is {a + b}.</s>\n"
    for a in range(12) for b in range(12)
] + [
    "### Human: Write a function that doubles a number.\n### Assistant: ```python\ndef double(x):\n    return 2 * x\n```",
    "### Human: Fix the grammar: she go to school.\n### Assistant: She goes to school.",
]


def _tiny_config():
    from rlhfchat.config import TinyModelConfig

    return TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny causal-LM folder (Llama, ~100k parameters) with the Vicuna v0 chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfchat.models import train_tokenizer

    cfg = _tiny_config()
    out = tmp_path_factory.mktemp("tiny_policy")
    tok = train_tokenizer(CORPUS, cfg.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    ))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny sequence-classification folder (one label) on the same tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_reward")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny-model runs: faster than two threads that other processes on a small
    machine compete for."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
