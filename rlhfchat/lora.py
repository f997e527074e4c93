"""LoRA adapters merged into weights: for a folder to save (`merged`, also from a 4-bit QLoRA base) and, out of
place, for fast generation (`merged_lora_weight`, `adapters_merged`).

Loading a model under LoRA (a 4-bit base for QLoRA) is models.load_pretrained's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


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
