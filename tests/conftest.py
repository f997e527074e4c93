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

    from rlhfchat.tiny import train_tokenizer

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A run folder with data, sft and reward done on one process (tests.test_stages' settings), for the tests of
    multi-process and DeepSpeed runs to copy and to compare with."""
    import json

    from rlhfchat.config import load_recipe
    from rlhfchat.train import reward, sft
    from tests.test_stages import REWARD, SFT, TINY, _write_data

    run = tmp_path_factory.mktemp("scale") / "run"
    _write_data(run / "data")
    for split in ("train", "eval"):
        recs = [json.loads(x) for x in (run / "data" / f"sft.{split}.jsonl").read_text().splitlines()]
        (run / "data" / f"prompts.{split}.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "source": "t", "prompt": r["messages"][:1]}) + "\n" for r in recs))
    r = load_recipe(None, ["name=t", f"output_dir={run}", *TINY, *SFT, *REWARD])
    sft.main(r)
    reward.main(r)
    return run


@pytest.fixture(scope="session")
def ppo_one(trained, tmp_path_factory) -> Path:
    """PPO on one process from `trained`'s models (tests.test_scale.PPO_ONE): the run that 2-process DDP and
    DeepSpeed runs of the same global batch must reproduce."""
    import shutil

    from tests.test_scale import ONE_PROC, PPO_ONE, _run

    run = tmp_path_factory.mktemp("ppo_one") / "run"
    shutil.copytree(trained, run)
    recipe_file = run.parent / "r.yaml"
    recipe_file.write_text("name: t\n")
    _run([*ONE_PROC, "ppo"], run, recipe_file, *PPO_ONE)
    return run
