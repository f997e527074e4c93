"""Speed-ups for training on a CPU, each measured on the development machine (docs/benchmarks.md). The runtime
(train/runtime.py) switches them on where a stage is set up; nothing else calls them. (The garbage-collector freeze
helps on any device and is used on every one.)

- `keep_freed_memory`, `startup_objects_frozen`: the process's memory settings (glibc's malloc, Python's collector).
- `own_trainable_weights`: trainable weights copied out of the checkpoint's file mapping before the first step.
- `FrozenPages`: the frozen networks' file-mapped weights resident only while their module runs.
- `optimizer_state_up_front`: AdamW's moments made before the first rollout, not in its first step.
- `fuse_norms`: a fused backward for RMSNorms running transformers' Llama RMSNorm code.
- `training_attention`: the attention kernel for a bf16 update's backward.

Memory settings
---------------
glibc's malloc is set to keep the memory a CPU training step frees for the next step (`keep_freed_memory`), and
the objects built at start-up taken out of Python's garbage collection (`startup_objects_frozen`).

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

Frozen weights resident while they run
--------------------------------------
from_pretrained leaves a frozen network's weights in the copy-on-write mapping of its safetensors file, and every
page a forward reads stays in the process's resident memory unless the kernel reclaims it: in PPO on a CPU the reference
and the reward model (152 MB for the bench's models) stay resident through the update and the generation, which
read neither, and each stays while the other runs. `FrozenPages` drops a module's pages from the process
(`madvise(MADV_DONTNEED)`) as its forward ends, so of the frozen networks only the layer running is resident. The
files stay in the kernel's page cache (memory it may reclaim, not the process's), from which the next forward maps
the pages back: no disk read while the kernel keeps them. Only pages still backed by the file are dropped (read in
/proc/self/pagemap): a page the process wrote to is its own copy, which dropping would lose, and it stays. On GPUs
OpenRLHF offers the like for the same two networks (`--ref_reward_offload`, which offloads them).

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
import mmap
import os
import platform
import types
import weakref
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


PAGE = mmap.PAGESIZE
_FILE_PAGE = 1 << 61  # /proc/PID/pagemap: the page is a file page or shared-anonymous
_SWAPPED = 1 << 62  # swapped out, or a migration entry: anonymous memory on its way somewhere
_PRESENT = 1 << 63


def _file_mappings() -> list[tuple[int, int]]:
    """The process's mappings of files (address ranges), from /proc/self/maps."""
    spans = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    return spans


def file_mapped_pages(tensors: list[torch.Tensor], maps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages of `tensors` that lie in one of `maps` (the file mappings), as merged address ranges."""
    spans = []
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        lo = -(-storage.data_ptr() // PAGE) * PAGE  # inward to whole pages: a neighbour's bytes are not ours
        hi = (storage.data_ptr() + storage.nbytes()) // PAGE * PAGE
        if hi > lo and any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in maps):
            spans.append((lo, hi))
    merged: list[list[int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


@lru_cache(maxsize=1)
def _madvise() -> Any:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def file_page_runs(entries: Any) -> list[tuple[int, int, int]]:
    """From pagemap entries (uint64 array, one per page): the runs of pages that are not the process's own copies,
    as (first page, end page, pages resident). Its own: resident, swapped out or being moved (a migration entry),
    and not the file's page."""
    import numpy as np

    present = (entries & np.uint64(_PRESENT)) != 0
    own = ((entries & np.uint64(_PRESENT | _SWAPPED)) != 0) & ((entries & np.uint64(_FILE_PAGE)) == 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([True], own, [True])).astype(np.int8)))
    return [(int(start), int(end), int(present[start:end].sum())) for start, end in zip(edges[::2], edges[1::2])]


def release_file_pages(spans: list[tuple[int, int]]) -> int:
    """Drop the pages in `spans` that are still the file's (not the process's own copies) from the process's
    resident memory; returns the bytes dropped. Nothing more is dropped once /proc/self/pagemap cannot be read."""
    import numpy as np

    if not spans:
        return 0
    madvise = _madvise()
    dropped = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for lo, hi in spans:
                pagemap.seek(lo // PAGE * 8)
                entries = np.frombuffer(pagemap.read((hi - lo) // PAGE * 8), dtype=np.uint64)
                for start, end, resident in file_page_runs(entries):
                    if resident:
                        madvise(lo + start * PAGE, (end - start) * PAGE, mmap.MADV_DONTNEED)
                        dropped += resident * PAGE
    except OSError:
        pass
    return dropped


def _released_after(spans: list[tuple[int, int]], module: nn.Module, args: Any, output: Any) -> None:
    release_file_pages(spans)  # a forward hook: returning None keeps the module's output


class FrozenPages:
    """Frozen networks whose weights are file-mapped pages, each module's resident only while it runs (see above).

    `add(model)` hooks the end of the forward of every module holding some of the model's weights: their pages are
    released then. `release()` (before generation, before each update) releases them all, for weights read outside
    their module's forward (a head tied to the embedding, say). A page read after its release is mapped back by the
    kernel: the hooks choose only when pages leave.
    """

    def __init__(self) -> None:
        self._spans: weakref.WeakKeyDictionary[nn.Module, list[tuple[int, int]]] = weakref.WeakKeyDictionary()

    def add(self, model: nn.Module) -> int:
        """Release `model`'s file-mapped weights after each forward of the module holding them; returns their bytes."""
        if platform.system() != "Linux":
            return 0
        try:
            maps = _file_mappings()
        except OSError:
            return 0
        held = self._spans.setdefault(model, [])
        for module in model.modules():
            spans = file_mapped_pages([*module.parameters(recurse=False), *module.buffers(recurse=False)], maps)
            if spans:
                module.register_forward_hook(functools.partial(_released_after, spans))
                held += [span for span in spans if span not in held]  # a tied weight is in two modules
        return sum(hi - lo for lo, hi in held)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The address ranges of the weights added, of the networks still alive."""
        return [span for spans in list(self._spans.values()) for span in spans]

    def release(self) -> int:
        """Drop every added network's pages from residence; returns the bytes dropped."""
        return release_file_pages(self.spans)


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
