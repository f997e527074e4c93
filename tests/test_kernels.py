"""cpu.fuse_norms: the fused RMSNorm computes transformers' Llama RMSNorm and its exact gradient, and is swapped
only into modules that run that code."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def _norm(hidden: int = 16):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_norm_equals_transformers_norm_and_its_gradient(dtype):
    from rlhfchat.train.cpu import fuse_norms

    plain, fused = _norm(), _norm()
    assert fuse_norms(fused) == 1
    x = (torch.randn(3, 5, 16) * 3).to(dtype)
    grad = torch.randn(3, 5, 16)
    results = []
    for norm in (plain, fused):
        xi = x.clone().requires_grad_(True)
        out = norm(xi)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), xi.grad, norm.weight.grad))
    assert type(fused(x.clone().requires_grad_(True)).grad_fn).__name__ == "_RMSNormBackward"
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_under_bf16_autocast_the_fused_norm_stays_in_float32():
    """The PPO update runs its forward and backward under autocast: the norm must not drop to bf16 there."""
    from rlhfchat.train.cpu import fuse_norms

    plain, fused = _norm(512), _norm(512)
    fuse_norms(fused)
    x = torch.randn(4, 7, 512) * 3
    grad = torch.randn(4, 7, 512)
    results = []
    for norm in (plain, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(xi)
            out.backward(grad)
        results.append((out.detach(), xi.grad, norm.weight.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_gradient_by_hand():
    """One row x = (3, 4), weight (1, 2), eps 0: r = 1 / sqrt(12.5), xhat = r x, y = w xhat.
    dL/dx = r (g - xhat mean(g xhat)) with g = dy w; dL/dw = dy xhat."""
    from rlhfchat.train.cpu import fuse_norms

    norm = _norm(2)
    norm.variance_epsilon = 0.0
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    fuse_norms(norm)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    norm(x).backward(torch.tensor([[1.0, 1.0]]))
    r = 12.5 ** -0.5
    xhat = [3 * r, 4 * r]
    g = [1.0, 2.0]
    mean = (g[0] * xhat[0] + g[1] * xhat[1]) / 2
    expected = [r * (g[i] - xhat[i] * mean) for i in range(2)]
    assert torch.allclose(x.grad, torch.tensor([expected]), atol=1e-6)
    assert torch.allclose(norm.weight.grad, torch.tensor(xhat), atol=1e-6)


def test_only_modules_running_llamas_norm_code_are_swapped_and_inference_keeps_their_own(tiny_model_dir):
    from transformers import AutoModelForCausalLM, GPT2Config

    from rlhfchat.train.cpu import fuse_norms

    class OnePlusWeight(nn.Module):  # Gemma's: weight * (1 + w), its own code
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = llama.config.num_hidden_layers
    assert fuse_norms(llama) == 2 * layers + 1 and fuse_norms(llama) == 0  # twice: the second finds them swapped
    assert fuse_norms(AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2))) == 0
    assert fuse_norms(OnePlusWeight()) == 0
    norm = llama.model.norm
    x = torch.randn(2, 3, llama.config.hidden_size)
    with torch.no_grad():
        assert norm(x).grad_fn is None and torch.equal(norm(x), type(norm).forward(norm, x))

