"""Fewer passes for the small elementwise parts of a decoder block's backward, swapped into a policy for PPO training.

    n = fuse_norms(lm)    # RMSNorm modules that run transformers' Llama RMSNorm code get a fused autograd Function

On a CPU the PPO update of a small model spends as much time in its RMSNorms as in its attention: autograd runs a
dozen broadcasting passes over the activations for each norm (pow, mean, rsqrt, three products and their
backwards). `_RMSNorm` computes the same function and its exact gradient in about half the passes. Only
modules whose forward is, line for line, transformers' `LlamaRMSNorm.forward` are swapped (Llama, Mistral, Qwen2/3,
Phi-3, ... not Gemma's `1 + weight`), and only where a gradient is taken: inference keeps the module's own forward.
"""

from __future__ import annotations

import inspect
import types
from functools import lru_cache
from typing import Any

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)), computed in float32 and cast back to x's dtype before the weight, as
    transformers' LlamaRMSNorm. Backward: with xhat = x * r, dx = r * (g - xhat * mean(g * xhat)), g = dy * weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the dot products in bf16
            x32 = x.float()
            r = torch.linalg.vecdot(x32, x32).div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)
            xhat = x32 * r
            ctx.save_for_backward(xhat, r, weight)
            ctx.input_dtype = x.dtype
            return weight * xhat.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        xhat, r, weight = ctx.saved_tensors
        grad_weight = grad_x = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                grad_weight = (grad * xhat.to(ctx.input_dtype)).flatten(0, -2).sum(0).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                g = (grad * weight).float()
                mean = torch.linalg.vecdot(g, xhat).div_(-xhat.shape[-1]).unsqueeze(-1)
                grad_x = torch.addcmul(g, xhat, mean).mul_(r).to(ctx.input_dtype)
        return grad_x, grad_weight, None


@lru_cache(maxsize=None)
def _runs_llama_rms_norm(cls: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if cls.forward is LlamaRMSNorm.forward:
        return True
    try:
        return inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (OSError, TypeError):
        return False


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fuse_norms(model: nn.Module) -> int:
    """Give every RMSNorm of `model` that runs transformers' Llama RMSNorm code the fused backward; returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
                and "forward" not in vars(module) and _runs_llama_rms_norm(type(module))):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            count += 1
    return count
