"""PPO as trlX v0.6.0 runs it: the KL controller's cadence, the MLP value head, num_rollouts per process; and 16-bit
policy weights that train through float32 master copies, and checkpoints by parameter name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rlhfchat.config import PPOConfig, load_recipe
from rlhfchat.data.schema import message
from rlhfchat.errors import RlhfchatError
from rlhfchat.train.optim import MasterWeightAdamW
from rlhfchat.train.policy import build_policy
from rlhfchat.train.ppo import PPO, plan_iterations

ROOT = Path(__file__).parents[1]
PROMPTS = [[message("user", f"What is {i} + 1?")] for i in range(6)]


def make_ppo(tiny_model_dir: Path, tiny_reward_dir: Path, *overrides: str, dtype=torch.float32) -> PPO:
    recipe = load_recipe(None, ["ppo.num_rollouts=6", "ppo.chunk_size=6", "ppo.batch_size=4", "ppo.ppo_epochs=3",
                                "ppo.generation.max_new_tokens=6", "ppo.learning_rate=0.01", "ppo.generation.max_prompt_length=64",
                                *overrides])
    return PPO.from_folders(tiny_model_dir, tiny_reward_dir, recipe.ppo, seed=0, dtype=dtype)


def test_kl_coefficient_after_an_iteration_follows_trlx_v060(tiny_model_dir, tiny_reward_dir):
    """trlX v0.6.0: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * batch_size / horizon), once per minibatch
    of the rollout (its post_backward_callback), not once per optimizer step."""
    ppo = make_ppo(tiny_model_dir, tiny_reward_dir, "ppo.init_kl_coef=0.2", "ppo.target=6", "ppo.horizon=100")
    exp, _ = ppo.make_experience(PROMPTS, seeds=range(6))
    assert ppo.mean_kl < 1e-6  # the policy is still the reference: the error is clipped at -0.2
    ppo.update(exp)
    # 6 rows in minibatches of 4: two a rollout (4 + 2; trlX's n_steps is the batch size for both); 3 PPO epochs
    # make 6 optimizer steps but move the controller twice
    assert ppo.optimizer_steps == 6
    beta = 0.2 * (1 - 0.2 * 4 / 100) ** 2
    assert ppo.kl_ctl.value == pytest.approx(beta, rel=1e-12)

    exp, stats = ppo.make_experience(PROMPTS, seeds=range(6, 12))
    assert stats["kl_coef"] == pytest.approx(beta, rel=1e-12)  # the coefficient this rollout's rewards used
    kl = ppo.mean_kl
    assert kl > 1e-4, "the update moved the policy away from the reference"
    ppo.kl_ctl.target = kl / 1.1  # an error of 0.1, inside the clip
    ppo.update(exp)
    assert ppo.kl_ctl.value == pytest.approx(beta * (1 + 0.1 * 4 / 100) ** 2, rel=1e-9)


def test_value_head_is_trlx_mlp_by_default_or_linear(tiny_model_dir):
    policy = build_policy(tiny_model_dir)
    head, d = policy.value_head, policy.lm.config.hidden_size
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]  # trlX v0.6.0 make_head(d, 1)
    assert head[0].weight.shape == (2 * d, d) and head[2].weight.shape == (1, 2 * d)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in head.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = policy(ids, torch.ones_like(ids), 2)
    assert out.values.shape == out.logprobs.shape == (1, 4)
    linear = build_policy(tiny_model_dir, value_head="linear").value_head
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (1, d)
    assert load_recipe(None, []).ppo.value_head == "mlp"
    with pytest.raises(RlhfchatError, match="ppo.value_head: expected one of 'mlp', 'linear'"):
        load_recipe(None, ["ppo.value_head=conv"])


def test_num_rollouts_are_per_process_and_the_13b_recipe_gets_trlx_sample_count():
    cfg = PPOConfig(num_rollouts=128, batch_size=8, ppo_epochs=4, total_steps=6000)
    for n in (1, 2, 8):  # every rank generates 128 samples and takes the same 64 optimizer steps per iteration
        assert plan_iterations(cfg, 10**6, n) == (6000 // 64, 64)
    recipe = load_recipe(ROOT / "recipes" / "stablevicuna-13b.yaml")
    # StableVicuna's trlX config: num_rollouts 128 and chunk_size 16 on each process, train.batch_size 8
    assert (recipe.ppo.num_rollouts, recipe.ppo.chunk_size, recipe.ppo.batch_size, recipe.ppo.grad_accum) == (
        128, 16, 8, 1)
    assert plan_iterations(recipe.ppo, 10**6, 8)[1] == recipe.ppo.ppo_epochs * 128 // 8
    small = PPOConfig(num_rollouts=8, batch_size=4, ppo_epochs=1, total_steps=100, epochs=1)
    assert plan_iterations(small, 32, 1)[0] == 4 and plan_iterations(small, 32, 2)[0] == 2  # epochs: prompt passes


def test_adamw_on_master_weights_keeps_updates_that_bf16_rounds_away():
    """At a learning rate of 2e-5 each AdamW step is below a bf16 weight's rounding step (about 1e-4 at 0.03): plain
    bf16 AdamW loses the updates, float32 master copies add them up."""
    torch.manual_seed(0)
    weight = (torch.rand(64, 64) * 0.02 + 0.02).to(torch.bfloat16)  # |w| in [0.02, 0.04]
    moved = {}
    for name in ("plain", "master"):
        p = nn.Parameter(weight.clone())
        opt = (torch.optim.AdamW([p], lr=2e-5, weight_decay=0.0) if name == "plain"
               else MasterWeightAdamW([p], lr=2e-5, weight_decay=0.0))
        for _ in range(10):
            p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad()
        moved[name] = float((p.detach() != weight).float().mean())
        if name == "master":
            (master,) = opt.masters()
            assert master.dtype == torch.float32 and p.grad is None and master.grad is None
            torch.testing.assert_close(master, weight.float() - 10 * 2e-5, rtol=0, atol=1e-6)
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert moved["plain"] < 0.05 and moved["master"] > 0.9


def test_bf16_policy_weights_train(tiny_model_dir, tiny_reward_dir, tmp_path):
    """base.dtype bfloat16 outside DeepSpeed: the policy is stored in bf16 and a step changes it, through float32
    master copies that the checkpoint holds."""
    ppo = make_ppo(tiny_model_dir, tiny_reward_dir, "ppo.learning_rate=1e-4", "ppo.ppo_epochs=1",
                   dtype=torch.bfloat16)
    inner = ppo.optimizer.torch_optimizer
    assert isinstance(inner, MasterWeightAdamW)
    named = ppo.trainable_parameters()
    lm = [(n, p) for n, p in named if n.startswith("lm.")]
    assert lm and all(p.dtype == torch.bfloat16 for _, p in lm)
    before = {n: p.detach().clone() for n, p in named}
    exp, _ = ppo.make_experience(PROMPTS, seeds=range(6))
    ppo.update(exp)
    masters = dict(zip((id(p) for p in inner.model_params), inner.masters()))
    for n, p in lm:
        assert masters[id(p)].dtype == torch.float32 and not torch.equal(masters[id(p)], before[n].float()), n
        assert torch.equal(p.detach(), masters[id(p)].to(torch.bfloat16)), n
        # every matrix moved in bf16 too; a norm's weights sit at 1.0, where bf16's step (0.008) is still ahead
        assert p.dim() == 1 or not torch.equal(p.detach(), before[n]), n
    ppo.save_checkpoint(tmp_path, 1, {})
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "step-000001" / "trainable.safetensors")
    assert all(saved[n].dtype == torch.float32 and torch.equal(saved[n], masters[id(p)]) for n, p in lm)


def test_checkpoint_by_name_resumes_to_the_same_update(tiny_model_dir, tiny_reward_dir, tmp_path):
    """A fresh PPO loaded from the checkpoint (weights, AdamW moments and step count by name) takes the same next
    update as the one that wrote it (the fused AdamW's bias correction depends on the step count)."""
    a = make_ppo(tiny_model_dir, tiny_reward_dir, "ppo.ppo_epochs=1")
    exp, _ = a.make_experience(PROMPTS, seeds=range(6))
    a.update(exp)
    a.save_checkpoint(tmp_path, 1, {})
    b = make_ppo(tiny_model_dir, tiny_reward_dir, "ppo.ppo_epochs=1")
    state = b.load_checkpoint(tmp_path / "step-000001")
    assert state["optimizer_step"] == 2 and b.kl_ctl.value == a.kl_ctl.value
    exp, _ = a.make_experience(PROMPTS, seeds=range(6, 12))
    for ppo in (a, b):
        torch.manual_seed(1)  # the same minibatch order
        ppo.update(exp)
    for (name, p), (_, q) in zip(a.trainable_parameters(), b.trainable_parameters()):
        assert torch.equal(p, q), name
    assert math.isclose(float(a.optimizer.torch_optimizer.state[a.trainable_parameters()[0][1]]["step"]), 4)
