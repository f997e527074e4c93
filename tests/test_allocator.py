"""The process settings of train/cpu.py, each checked in a fresh process: glibc keeps the memory a training
step frees (where a large block comes from, the page faults of steps that allocate and free the same memory), and
the objects of start-up leave the garbage collector's generations while start-up's garbage is collected."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, resource, sys, torch
from rlhfchat.train.cpu import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
set_ = keep_freed_memory() if sys.argv[1] == "set" else False
before = mallinfo2().hblkhd
big = torch.ones(4 << 20)  # 16 MB
own_mapping = mallinfo2().hblkhd - before >= big.nbytes  # a block glibc maps alone and unmaps when it is freed
del big

def step():  # a step's activations: 80 MB allocated, written and freed together
    tensors = [torch.ones(1 << 20) for _ in range(20)]
    del tensors

step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(set_, own_mapping, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _run(mode: str, **env: str) -> tuple[str, str, int]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env={**clean, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    return out[0], out[1], int(out[2])


def _glibc() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


@pytest.mark.skipif(_glibc() < (2, 33), reason="glibc's mallopt, and mallinfo2 (glibc 2.33)")
def test_freed_step_memory_stays_with_the_process():
    assert _run("default")[:2] == ("False", "True")  # glibc's default: a 16 MB block is a mapping of its own
    is_set, own_mapping, faults = _run("set")
    assert (is_set, own_mapping) == ("True", "False")  # from the heap, which keeps it when it is freed
    # 10 steps touch 204,800 pages; reused memory does not fault again (the default faults up to all of them)
    assert faults < 20_000, faults
    # a choice made in the environment wins: nothing is set
    assert _run("set", MALLOC_ARENA_MAX="2")[:2] == ("False", "True")


FREEZE = """
import gc, weakref
from rlhfchat.train.cpu import startup_objects_frozen

class Node:
    pass

loaded = [[i] for i in range(100_000)]  # what start-up keeps (models, tokenizers, configs); lists are tracked
cycle = Node()
cycle.self = cycle  # start-up's garbage: only a collection frees a cycle
collected = []
weakref.finalize(cycle, collected.append, True)
del cycle
with startup_objects_frozen():
    print(collected == [True], gc.get_freeze_count() >= 100_000, len(gc.get_objects()) < 10_000)
print(gc.get_freeze_count() == 0)  # back in the collected generations
"""


def test_startup_objects_stay_frozen_inside_the_block_after_their_garbage_is_collected():
    proc = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True", "True"]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_stepped_from_its_state_made_up_front_steps_as_from_scratch(fused, amsgrad):
    """cpu.optimizer_state_up_front: step 0 and zero moments before the first step, and then the same weights and
    state after three steps as an AdamW that made its own state; other optimizers and a second call are left alone."""
    import torch

    from rlhfchat.train.cpu import optimizer_state_up_front

    torch.manual_seed(0)
    start = [torch.randn(3, 4), torch.randn(5)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    runs = []
    for up_front in (False, True):
        params = [w.clone().requires_grad_(True) for w in start]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, amsgrad=amsgrad, fused=fused)
        if up_front:
            assert optimizer_state_up_front(opt) and not optimizer_state_up_front(opt)
            state = opt.state[params[0]]
            assert float(state["step"]) == 0 and not state["exp_avg"].any() and ("max_exp_avg_sq" in state) == amsgrad
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs.append((params, [opt.state[p] for p in params]))
    (plain, plain_state), (front, front_state) = runs
    for a, b in zip(plain, front):
        assert torch.equal(a, b)
    for a, b in zip(plain_state, front_state):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert a["step"].dtype == b["step"].dtype
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    assert not optimizer_state_up_front(sgd) and not sgd.state
