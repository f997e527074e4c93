"""The `tiny` base model, built locally, and the hidden "base" stage that builds it once per run.

`tiny` is a random-init Llama (a few million parameters) with a byte-level BPE tokenizer trained on the run's own
data, built deterministically from the seed, so the demo and the tests need nothing from outside:

    python -m rlhfchat.tiny OUT_DIR runs/tiny/data/sft.train.jsonl

`ensure_base(recipe)` is what the SFT stage calls: `base.model` as the recipe gives it, or the tiny model built under
`<run>/base/` (with its own manifest, skipped when it is complete).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from rlhfchat.config import TinyModelConfig
from rlhfchat.data.chat_format import SYSTEM_PROMPT, apply_template, render
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import resolve_model

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts), as a fast HF tokenizer.

    With `split_digits` every digit is a token of its own ("19" is "1", "9"), as in Llama's and Qwen's tokenizers: a
    number is then spelt the same way wherever it appears, and a small model can learn arithmetic digit by digit
    instead of one token per number it has seen.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No automatic BOS: the chat template is the whole input, the same in training, serving and evaluation.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    hf.padding_side = "left"  # generation pads on the left; trainers set what they need
    return apply_template(hf)


def _texts_from_jsonl(paths: Iterable[Path]) -> Iterable[str]:
    """Every message text of canonical records, rendered through the chat template."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "messages" in rec:
                    yield render(rec["messages"])
                else:
                    yield render(rec["prompt"] + [{"role": "assistant", "content": rec.get("chosen", "")}])
                    if "rejected" in rec:
                        yield rec["rejected"]


def build_tiny(out_dir: str | Path, corpus: list[Path], cfg: TinyModelConfig, seed: int = 0) -> Path:
    """Build the tiny base model folder (config, safetensors, tokenizer with chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [SYSTEM_PROMPT, *list(_texts_from_jsonl(corpus))]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_base(recipe: Any) -> str:
    """The base model of a run: `base.model` as given, or the `tiny` model built under `<run>/base/` once.

    The tiny model's tokenizer is trained on the run's SFT and preference data, so the data stage comes first.
    """
    from rlhfchat import manifest
    from rlhfchat.config import config_hash

    if recipe.base.model != "tiny":
        resolve_model(recipe.base.model, "base.model")  # offline and not in the cache: one line, before any work
        return recipe.base.model
    run = recipe.run_dir
    stage_dir = run / "base"
    corpus = [run / "data" / "sft.train.jsonl", run / "data" / "preferences.train.jsonl"]
    for p in corpus:
        if not p.is_file():
            raise RlhfchatError(f"{p}: not found; the tiny base model is built from the run's data: "
                                f"run `rlhfchat data RECIPE.yaml` first")
    chash = config_hash({"tiny": recipe.base.tiny, "seed": recipe.seed})
    inputs = manifest.input_hashes(run, corpus)
    manifest.sweep(stage_dir)  # what an interrupted build left, also when the base is complete
    if not manifest.is_complete(stage_dir, chash, inputs):
        with manifest.running("base", stage_dir, chash, inputs):
            build_tiny(stage_dir, corpus, recipe.base.tiny, seed=recipe.seed)
        print(f"[base] tiny Llama built in {stage_dir}")
    return str(stage_dir)


if __name__ == "__main__":
    build_tiny(sys.argv[1], [Path(p) for p in sys.argv[2:]], TinyModelConfig())
