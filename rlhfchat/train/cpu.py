"""Speed-ups for training on a CPU, each measured on the development machine (docs/benchmarks.md). The runtime
(train/runtime.py) switches them on where a stage is set up; nothing else calls them. (The garbage-collector freeze
helps on any device and is used on every one.)

- `keep_freed_memory`, `startup_objects_frozen`: the process's memory settings (glibc's malloc, Python's collector).
- `own_trainable_weights`: trainable weights copied out of the checkpoint's file mapping before the first step.
- `optimizer_state_up_front`: AdamW's moments made before the first rollout, not in its first step.
- `fuse_norms`: a fused backward for RMSNorms running transformers' Llama RMSNorm code.
- `training_attention`: the attention kernel for a bf16 update's backward.

Memory settings
---------------
glibc's malloc is set to keep the memory a CPU training step frees for the next step (`keep_freed_memory`), and the objects built at start-up taken out of Python's garbage collection
(`startup_objects_frozen`).

glibc serves a large allocation from a fresh memory mapping (above its mmap threshold: 128 KB at first, raised
towards 32 MB as it sees such blocks freed) and gives memory back to the kernel once more than its trim threshold
is free at the top of the heap. A PPO step frees its activations and gradients and allocates the same sizes again
in the next one, so every step page-faults much of its working set in again: `rlhfchat bench ppo` took 600,000 to
740,000 page faults on the development machine, and 265,000 with these settings, 4% more samples per second.
PyTorch's CPU performance guide recommends an allocator that keeps memory for reuse (jemalloc, tcmalloc); this
gets the same from glibc's own settings: blocks below 32 MB come from the heap, and the heap is trimmed only once
1 GB of it is free. The bench's peak memory did not change (1,250-1,290 MB either way); memory freed after
the peak stays with the process.

Nothing changes on other C libraries, or where the environment already chose (MALLOC_* or GLIBC_TUNABLES set, or
an allocator preloaded with LD_PRELOAD).

Fused RMSNorm
-------------
On a CPU the PPO update of a small model spends as much time in its RMSNorms as in its attention: autograd runs a
dozen broadcasting passes over the activations for each norm (pow, mean, rsqrt, three products and their
backwards). `_RMSNorm` computes the same function and its exact gradient in about half the passes. Only
modules whose forward is, line for line, transformers' `LlamaRMSNorm.forward` are swapped (Llama, Mistral, Qwen2/3,
Phi-3, ... not Gemma's `1 + weight`), and only where a gradient is taken: inference keeps the module's own forward.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import inspect
import os
import platform
import types
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
from torch import nn

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 1 << 30

_set = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); returns whether they are set."""
    global _set
    if _set:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or {"GLIBC_TUNABLES", "LD_PRELOAD"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    _set = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _set


@contextlib.contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Inside this block, what was alive on entry stays out of the garbage collector's generations.

    The models, tokenizers and configs loaded at start-up (about 500,000 tracked objects for the bench's three
    models) live for the whole run, yet each full collection scans them all again: 0.1-0.2 s a time on the
    development machine, and in `rlhfchat bench ppo --lora` one fell in the first rollout more often than not
    (first generation 0.85-0.91 s, 0.64-0.68 s with this). On entry start-up's garbage is collected and everything
    alive moves into the permanent generation (`gc.freeze`, as vLLM does after its start-up); on exit it moves back,
    so what the run leaves behind (a finished stage's models, in a pipeline) can be collected again.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def optimizer_state_up_front(optimizer: torch.optim.Optimizer) -> bool:
    """Give a torch AdamW with no state yet the state its first step would create (step 0, zero moments) now, through
    its own load_state_dict; returns whether it did. Stepping from it is stepping from scratch.

    AdamW creates its moments (twice the trainable weights) in its first step, which in PPO comes after the first
    rollout: they land in the holes the rollout's freed tensors left in the heap and at its top, and the heap ends
    up larger than what is alive in it. Made before any rollout, they sit at the bottom with the weights: the bench's
    peak (`rlhfchat bench ppo --advantage-estimator grpo`, one thread) fell from 1,074-1,100 MB to 1,026-1,043 MB.
    """
    if type(optimizer) is not torch.optim.AdamW or optimizer.state:
        return False
    zeros = functools.partial(torch.zeros_like, memory_format=torch.preserve_format)
    state = dict(enumerate(
        {"step": torch.tensor(0.0), **{name: zeros(param) for name in
                                       ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if group["amsgrad"] else 2]}}
        for group in optimizer.param_groups for param in group["params"]))
    optimizer.load_state_dict({**optimizer.state_dict(), "state": state})  # its own placement of `step`
    return True


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


def own_trainable_weights(model: nn.Module) -> None:
    """Copy the trainable parameters out of the checkpoint's file mapping into the process's own memory (CPU).

    from_pretrained maps a safetensors file copy-on-write and the parameters are views of that mapping, so the first
    write to each 4 KB page (the first optimizer step) is a page fault that copies it: 0.34 s for a 110 MB model on
    the development machine, against 0.03 s for this copy. Frozen weights stay mapped (never written, not copied).
    On a GPU the weights leave the mapping when they move to the device; there this is not needed.
    """
    with torch.no_grad():
        for param in model.parameters():  # tied weights are one parameter: copied once, still tied
            if param.requires_grad:
                param.data = param.data.clone()


def training_attention(device: torch.device, mixed_precision: str | None) -> contextlib.AbstractContextManager:
    """The attention kernel for the PPO update's forward and backward.

    On a CPU under bf16 autocast this picks PyTorch's plain (math) attention: its CPU flash-attention backward in bf16
    takes about 8x its forward (9-11 ms against 3.5-4 ms for the math kernel's, on a minibatch of 8 x 63 queries over
    123 keys); in float32, and on GPUs, the default choice stands.
    """
    if device.type == "cpu" and mixed_precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
