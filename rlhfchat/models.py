"""Model folders: where a model is (`resolve_model`: a folder, a hub id, never a weight delta), the one loader of a
model folder (`load_model_folder`, with the one adapter lookup `find_adapter`), its tokenizer with our chat template
(`load_tokenizer`), dtypes, and QLoRA's 4-bit loading (`load_pretrained`).

The tiny base model and its stage are in tiny.py; merging LoRA adapters into weights is lora.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfchat.data.chat_format import choose_template
from rlhfchat.errors import RlhfchatError


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
        _refuse_a_scorer_as_a_generator(path, source, auto_cls, what)
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


def _refuse_a_scorer_as_a_generator(path: str | Path, source: str | Path, auto_cls: Any, what: str) -> None:
    """A reward model's folder (a ...ForSequenceClassification) opened to generate text: transformers would load its
    trunk under a new, random LM head and the chat would answer in noise; one line instead."""
    config = Path(source) / "config.json"
    if getattr(auto_cls, "__name__", "") != "AutoModelForCausalLM" or not config.is_file():
        return
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # from_pretrained says what is wrong with it
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise RlhfchatError(f"{path}: a reward model ({archs[0]}: one score per text), not {what}; give a folder "
                            "that generates text, e.g. RUN/sft or RUN/ppo")


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
# QLoRA: a 4-bit base under LoRA adapters (merging them back into a full-precision folder: lora.merged)


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
