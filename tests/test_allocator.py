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


@pytest.mark.skipif(platform.system() != "Linux" or not os.access("/proc/self/pagemap", os.R_OK),
                    reason="reads the process's page map (Linux)")
def test_frozen_weights_leave_residence_after_their_module_runs_and_written_pages_stay(tmp_path):
    """cpu.FrozenPages: a frozen model read from its safetensors mapping gives the same output with its pages
    released after each module's forward, almost none of the file's pages stay resident after it (none after
    `release()`), the next forward maps them back, and a weight the process wrote to (its own copy-on-write pages)
    keeps what was written."""
    import mmap

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhfchat.models import load_model_folder
    from rlhfchat.train.cpu import FrozenPages, _file_mappings, file_mapped_pages
    from tests._pagemap import resident_file_bytes as _resident_file_bytes

    page = mmap.PAGESIZE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path)
    ids = torch.randint(0, 1024, (2, 9))

    def frozen_edited() -> torch.nn.Module:
        model = load_model_folder(tmp_path, AutoModelForCausalLM, torch.float32).requires_grad_(False).eval()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.add_(1.0)  # written in place: copy-on-write pages
        return model

    plain, model = frozen_edited(), frozen_edited()
    with torch.inference_mode():
        expected = plain(ids).logits
    pages = FrozenPages()
    weight_bytes = sum(t.nbytes for t in model.state_dict().values())
    assert 0.9 * weight_bytes < pages.add(model) <= weight_bytes
    spans, written = pages.spans, model.model.layers[1].mlp.down_proj.weight
    file_bytes, own_bytes = _resident_file_bytes(spans)
    assert own_bytes >= written.nbytes - 2 * page  # the edit's pages are the process's own
    for _ in range(2):  # the second forward reads the pages released by the first
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, expected)
        # what stays is what the kernel's fault-around mapped beside a later module's pages (64 KB windows around
        # each fault by default: at most a few MB for the model's 21 weights, against its 25 MB)
        file_bytes, own_bytes = _resident_file_bytes(spans)
        assert file_bytes < 0.25 * weight_bytes and own_bytes >= written.nbytes - 2 * page
        assert pages.release() == file_bytes and _resident_file_bytes(spans) == (0, own_bytes)
    assert torch.equal(written, plain.model.layers[1].mlp.down_proj.weight)
    # the control: without FrozenPages the file's pages a forward read stay resident
    plain_spans = file_mapped_pages(list(plain.parameters()), _file_mappings())
    assert _resident_file_bytes(plain_spans)[0] > 0.8 * (weight_bytes - written.nbytes)


def test_the_runs_released_leave_out_every_page_the_process_wrote_to():
    """cpu.file_page_runs on literal pagemap entries: the file's resident pages and pages not resident are released
    in runs; a written page (present, not the file's), a swapped-out one and a migration entry (bit 62) never are."""
    import numpy as np

    from rlhfchat.train.cpu import file_page_runs

    present, swapped, file_page = 1 << 63, 1 << 62, 1 << 61
    entries = np.array([present | file_page | 7, present | file_page, 0,  # the file's, the file's, not resident
                        present | 5,  # written: the process's own copy
                        0, swapped | 3,  # not resident; swapped out (the process's own copy, in swap)
                        present | file_page, swapped | (2 << 5), present | file_page],  # a migration entry between
                       dtype=np.uint64)
    assert file_page_runs(entries) == [(0, 3, 2), (4, 5, 0), (6, 7, 1), (8, 9, 1)]
    assert file_page_runs(np.array([present | 1], dtype=np.uint64)) == []
    assert file_page_runs(np.array([], dtype=np.uint64)) == []
    assert file_page_runs(np.array([0, 0], dtype=np.uint64)) == [(0, 2, 0)]
