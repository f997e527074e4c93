"""Model folders: the `tiny` base model built locally, and loading any Hugging Face folder with our template.

`tiny` is a random-init Llama (a few million parameters) with a byte-level BPE tokenizer trained on the run's own
data, built deterministically from the seed, so the demo and the tests need nothing from outside:

    python -m rlhfchat.models OUT_DIR runs/tiny/data/sft.train.jsonl

Also what rollouts and the chat engine both decode with: `reserve_cache`, the KV cache they write into (room
reserved ahead, no copy of the whole cache per token), and `inverse_cdf_sample`, their draw of a token.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from rlhfchat.config import TinyModelConfig
from rlhfchat.data.chat_format import SYSTEM_PROMPT, apply_template, choose_template, render
from rlhfchat.errors import RlhfchatError

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


def resolve_model(path: str | Path, what: str = "") -> str:
    """Where to load a model from, for `from_pretrained`: a local folder as it is, or a hub id (hub.model_ref: the id
    when the hub answers, the cached copy when it cannot be reached, else one line saying so). A weight delta is
    refused with the command that applies it. Every loader of a model folder calls this first; `what` names the
    option or recipe field in errors (e.g. `eval.models`).
    """
    from rlhfchat.delta import card as delta
    from rlhfchat import hub

    folder = Path(path).expanduser()
    if folder.is_dir():
        delta.refuse(folder, shown_as=str(path))
        return str(path)
    if folder.exists():
        raise RlhfchatError(f"{hub.prefix(what)}{path}: a file, not a model folder or hub id")
    if not hub.is_hub_id(str(path)):
        raise RlhfchatError(f"{hub.prefix(what)}{path}: no such folder")
    return hub.model_ref(str(path), what)


@dataclass
class Adapter:
    """A LoRA adapter folder (peft's adapter_config.json): the adapters, the base model they were trained on, and
    where its tokenizer is (the adapter folder when it has tokenizer files, else the base)."""

    folder: Path
    base: str
    """The base model as `from_pretrained` takes it (resolve_model of base_model_name_or_path)."""
    tokenizer: str


def find_adapter(source: str | Path) -> Adapter | None:
    """The LoRA adapter in a folder, or None when it holds no adapter_config.json (a plain model folder, a hub id).
    The one place an adapter folder's base model is looked up."""
    folder = Path(source)
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise RlhfchatError(f"{config}: not JSON ({e})") from None
    if not base:
        raise RlhfchatError(f"{config}: no base_model_name_or_path, so the base model is unknown")
    base = resolve_model(base, f"{config}: base_model_name_or_path")
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return Adapter(folder, base, str(folder) if has_tokenizer else base)


def load_model_folder(path: str | Path, auto_cls: Any = None, dtype: torch.dtype = torch.float32,
                      what: str = "a model", **kwargs: Any) -> Any:
    """`auto_cls.from_pretrained` (AutoModelForCausalLM by default) of a model folder or hub id (resolve_model: a
    weight delta is refused, offline a hub id is its cached copy), every failure one line naming the folder and
    `what` it should have held. A LoRA adapter folder (find_adapter) loads its base model with the adapters merged
    in. The one loader of a model folder: training, the reward scorer, evaluation and the chat engine."""
    if auto_cls is None:
        from transformers import AutoModelForCausalLM as auto_cls
    source = resolve_model(path)
    adapter = find_adapter(source)
    if adapter is None:
        try:
            return auto_cls.from_pretrained(source, dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:
            raise RlhfchatError(f"{path}: cannot load {what} ({str(e).splitlines()[0]})") from None
    try:
        model = auto_cls.from_pretrained(adapter.base, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise RlhfchatError(f"{path}: cannot load the adapter's base model {adapter.base} "
                            f"({str(e).splitlines()[0]})") from None
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter.folder).merge_and_unload()


def load_tokenizer(path: str | Path, chat_template: str = "model") -> Any:
    """The tokenizer of a model folder with a pad token and its chat template: the folder's own (Vicuna v0 where it
    has none), or as `chat_template` says (chat_format.choose_template: model, vicuna_v0 or a Jinja file). A LoRA
    adapter folder without tokenizer files has its base model's."""
    from transformers import AutoTokenizer

    source = resolve_model(path)
    adapter = find_adapter(source)
    source = adapter.tokenizer if adapter is not None else source
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise RlhfchatError(f"{path}: cannot load a tokenizer, expected a model folder or hub id with one "
                            f"({str(e).splitlines()[0].rstrip(': ')})") from None
    choose_template(tok, chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def folder_dtype(folder: str | Path) -> str:
    """The dtype a model folder's weights are stored in (its config.json's `dtype`, `torch_dtype` before
    transformers 5): float32, bfloat16 or float16; float32 when it says none of these."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


# --------------------------------------------------------------------------------------------------------------
# QLoRA: a 4-bit base under LoRA adapters, and merging them back into a full-precision folder


def load_pretrained(auto_cls: Any, path: str | Path, dtype: torch.dtype, lora: Any = None, field: str = "lora",
                    gradient_checkpointing: bool = False, **kwargs: Any) -> Any:
    """`auto_cls.from_pretrained(path)`; with `lora.quantize: 4bit` the base is loaded in 4-bit NF4 (QLoRA).

    4-bit: bitsandbytes' NF4 with double quantization and bf16 compute, every linear layer but the output layer
    (and a classifier's `score` head) quantized, then peft's `prepare_model_for_kbit_training` (layer norms and
    embeddings in fp32, input gradients on). The caller puts the LoRA adapters on top, as without quantization.
    `field` names the recipe key in errors (e.g. `sft.lora.quantize`).
    """
    quantize = getattr(lora, "quantize", None) if lora is not None else None
    path = resolve_model(path)
    if not quantize:
        return load_model_folder(path, auto_cls, dtype, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RlhfchatError(f"{field}: {quantize} needs bitsandbytes; pip install 'rlhfchat[qlora]'") from None
    import os

    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head", "score"])
    # a quantized model is placed at load time (Trainer and accelerate do not move it): this rank's own GPU
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        model = auto_cls.from_pretrained(str(path), dtype=dtype, quantization_config=config, device_map={"": device},
                                         **kwargs)
    except (OSError, ValueError) as e:
        raise RlhfchatError(f"{path}: cannot load a model in 4-bit ({str(e).splitlines()[0]})") from None
    if device == "cpu":
        # bitsandbytes' CPU layers switch, after their first forward in eval mode, to a packed inference layout
        # with no backward: LoRA gradients through the frozen 4-bit layers would then be silently zero.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def is_quantized(model: Any) -> bool:
    """True for a model (or a peft model over one) whose base weights are 4-bit or 8-bit bitsandbytes layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def merged(model: Any, dtype: torch.dtype | str = "auto") -> Any:
    """A plain model to save: LoRA adapters merged into the weights, and for a 4-bit base (QLoRA) a full-precision one.

    A 4-bit base is not merged in place (that would round the merged weights to 4 bits again): the base folder
    the adapters were trained on is loaded again in `dtype` ("auto": the dtype stored in that folder) and the
    trained adapters (and a classifier's trained head) are merged into it. Anything else: `merge_and_unload()`.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    if not is_quantized(model):
        return model.merge_and_unload()
    import copy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    peft_config = copy.deepcopy(model.peft_config["default"])
    quantized = model.get_base_model()
    kwargs = {"num_labels": quantized.config.num_labels} if hasattr(quantized, "score") else {}
    base = type(quantized).from_pretrained(peft_config.base_model_name_or_path, dtype=dtype, **kwargs)
    base.config.pad_token_id = quantized.config.pad_token_id
    fresh = get_peft_model(base, peft_config)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    return fresh.merge_and_unload()


def merged_lora_weight(layer: Any) -> tuple[torch.Tensor, list[str]]:
    """A peft LoRA layer's base weight with its active adapters (those enabled and not merged already) added out of
    place, W + B @ A x scale, and the names of those adapters. The base weight is not touched: merging and unmerging
    in place would leave rounding in it, and the frozen base is the PPO reference. No adapter to add: the base
    weight itself and [].
    """
    weight = layer.get_base_layer().weight.data
    if getattr(layer, "disable_adapters", False):
        return weight, []
    merged = getattr(layer, "merged_adapters", [])
    active = [a for a in getattr(layer, "active_adapters", []) if a in getattr(layer, "lora_A", {}) and a not in merged]
    with torch.no_grad():
        for adapter in active:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight, active


@contextlib.contextmanager
def adapters_merged(model: Any) -> Iterator[Any]:
    """The model with its active LoRA adapters merged into copies of the weights they adapt, for inference.

    Each adapted layer then runs one product instead of three and the adapter's scaling and addition: on a CPU a
    16-row decode step spends as long in those small operations as in the weights. The original weights are put back
    afterwards, untouched (merged_lora_weight). Costs one copy of every adapted weight while inside. A model without
    adapters, or with a 4-bit base, is yielded as it is.
    """
    from_peft = hasattr(model, "peft_config") and not is_quantized(model)
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "merged_adapters")] \
        if from_peft else []
    saved = []
    try:
        for layer in layers:
            weight, active = merged_lora_weight(layer)
            if active:
                base = layer.get_base_layer().weight
                saved.append((layer, base.data, list(layer.merged_adapters)))
                base.data = weight
                layer.merged_adapters.extend(active)
        yield model
    finally:
        for layer, data, merged_names in saved:
            layer.get_base_layer().weight.data = data
            layer.merged_adapters[:] = merged_names


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
