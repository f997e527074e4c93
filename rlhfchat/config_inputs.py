"""The recipe's inputs: the data sources it reads (the `data:` section) and the model it starts from (`base:`).

Part of the recipe's typed dataclasses; `rlhfchat.config` holds the rest and re-exports these, so code and users
import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhfchat.errors import RlhfchatError

SOURCES_SFT = ("oasst1", "gpt4all", "alpaca", "gsm8k", "messages")
SOURCES_PREFERENCES = ("oasst1", "hh_rlhf", "shp", "feedback", "preferences")
SOURCES_PROMPTS = ("oasst1", "gpt4all", "alpaca", "hh_rlhf", "shp", "feedback", "gsm8k", "messages", "preferences",
                   "prompts")


@dataclass
class SourceConfig:
    """One published dataset feeding one kind of record (sft, preferences or prompts)."""

    source: str
    """Adapter name (a module of rlhfchat/data/): the published formats oasst1, gpt4all, alpaca, hh_rlhf, shp, gsm8k;
    feedback (`rlhfchat feedback export`); and the standard formats messages (HF/TRL conversational, ShareGPT),
    preferences (TRL's preference formats) and prompts (plain or conversational prompt lists)."""
    path: str
    """A local file or folder (.parquet, .jsonl, .jsonl.gz, .json; folders searched recursively) or a hub id."""
    split: str = "train"
    """Split to read: of a hub id, or the files of a local folder that name it (`train-00000-of-00001.parquet`). A
    slice as in `datasets` takes part of it: `train[:50%]`, `train[50%:]`, `train[100:200]` (so that SFT and RL
    prompts can take two halves of one published split)."""
    subset: str | None = None
    """Hub configuration name or data_dir (e.g. `helpful-base` for hh-rlhf, `main` for gsm8k); for a local folder,
    its subfolder of that name when it has one."""
    weight: float = 1.0
    """Sampling weight: above 1 samples with replacement, below 1 subsamples."""
    max_examples: int | None = None
    """Keep at most this many records from this source (after weighting)."""
    langs: list[str] | None = None
    """oasst1: keep only trees whose root message is in one of these languages (e.g. [en])."""
    pairs: Literal["best_vs_rest", "all", "best_vs_worst"] = "best_vs_rest"
    """oasst1 preferences: which ranked replies become pairs."""
    min_score_ratio: float = 2.0
    """shp: skip pairs whose score_ratio is below this."""
    strict: bool = False
    """Make a malformed row an error instead of a counted skip."""
    held_out: bool = False
    """Every record of this source goes to the eval file of its kind, none to train (a published test split: give
    `split: test`). A kind with such a source takes its eval records from them alone: `eval_fraction` holds out
    nothing from its other sources."""


@dataclass
class DataConfig:
    """The data stage: sources -> canonical JSONL records + card.json."""

    eval_fraction: float = 0.05
    """Share of each kind held out for evaluation (0 keeps everything for training)."""
    sft: list[SourceConfig] = field(default_factory=list)
    """Sources of SFT conversations (each adapter's `sft` records)."""
    preferences: list[SourceConfig] = field(default_factory=list)
    """Sources of preference pairs (reward model, DPO, KTO)."""
    prompts: list[SourceConfig] = field(default_factory=list)
    """Sources of prompts for RL (PPO's rollouts) and evaluation."""
    dedupe: bool = True
    """Remove exact duplicates across sources (same messages, or same prompt/chosen/rejected)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise RlhfchatError(f"data.eval_fraction: expected a number in [0, 1), got {self.eval_fraction}")
        for kind, allowed in (("sft", SOURCES_SFT), ("preferences", SOURCES_PREFERENCES), ("prompts", SOURCES_PROMPTS)):
            for i, src in enumerate(getattr(self, kind)):
                if src.source not in allowed:
                    raise RlhfchatError(
                        f"data.{kind}[{i}].source: unknown source {src.source!r}; valid: {', '.join(allowed)}"
                    )
                if src.weight <= 0:
                    raise RlhfchatError(f"data.{kind}[{i}].weight: expected > 0, got {src.weight}")


@dataclass
class TinyModelConfig:
    """Shape of the `tiny` base model: a random-init Llama with a BPE tokenizer trained on the run's data."""

    vocab_size: int = 2048
    """Size of the BPE vocabulary trained on the run's data (special tokens included)."""
    hidden_size: int = 128
    """Width of the hidden states."""
    intermediate_size: int = 384
    """Width of each block's MLP."""
    num_hidden_layers: int = 4
    """Decoder blocks."""
    num_attention_heads: int = 4
    """Attention heads (as many key/value heads)."""
    max_position_embeddings: int = 512
    """Longest sequence the model takes (its context window)."""


@dataclass
class BaseConfig:
    """The model the run starts from, and its chat format."""

    model: str = "tiny"
    """A Hugging Face model folder or hub id, or `tiny` (built locally, deterministic)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """The shape of the `tiny` model (used when `model: tiny`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype weights are stored and trained in (on GPUs, bfloat16 trains under bf16 autocast; 16-bit PPO policies keep float32 master copies)."""
    chat_template: str = "model"
    """The chat format of the whole run (SFT, reward, PPO, eval, serving): `model` keeps the base model's own chat
    template (Vicuna v0 when it has none), `vicuna_v0` is StableVicuna's, or the path of a Jinja template file. The
    SFT folder saves it with its tokenizer; every later stage reads it from there."""
