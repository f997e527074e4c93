"""Issue 8 on CPU: every stage under `accelerate launch` with 2 processes, resume across process counts, LoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfchat import manifest
from rlhfchat.config import load_recipe
from tests.test_stages import REWARD, SFT, TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TWO_PROCS = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), "-m", "rlhfchat.cli"]
ONE_PROC = [sys.executable, "-m", "rlhfchat.cli"]
PPO = ["ppo.num_rollouts=8", "ppo.chunk_size=8", "ppo.batch_size=4", "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=8",
       "ppo.eval_prompts=4", "ppo.save_steps=1", "ppo.learning_rate=1e-4"]
# The parity runs: 8 samples an iteration, 3 iterations of 2 optimizer steps; one process takes them in one minibatch
# of 8 (PPO_ONE), two in minibatches of 4 on each (num_rollouts and batch_size are per process, as in trlX v0.6.0).
PPO_PARITY = [*PPO, "ppo.generation.max_new_tokens=12", "ppo.ppo_epochs=2", "ppo.eval_prompts=3", "ppo.save_steps=100",
              "ppo.total_steps=6"]
PPO_ONE = [*PPO_PARITY, "ppo.num_rollouts=8", "ppo.batch_size=8"]
PPO_TWO = [*PPO_PARITY, "ppo.num_rollouts=4", "ppo.batch_size=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd, run_dir, recipe_file, *overrides, check=True):
    out = subprocess.run([*cmd, str(recipe_file), f"output_dir={run_dir}", *TINY, *SFT, *REWARD, *overrides],
                         capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(path: Path, key: str) -> list[float]:
    return [x[key] for x in map(json.loads, path.read_text().splitlines()) if key in x]


def test_reward_two_processes_match_one(tmp_path, trained):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    runs = {}
    for name, cmd, batch in (("one", ONE_PROC, 8), ("two", TWO_PROCS, 4)):
        run = tmp_path / name
        shutil.copytree(trained, run, ignore=shutil.ignore_patterns("reward"))
        _run([*cmd, "reward"], run, recipe_file, "reward.max_steps=4", "reward.logging_steps=1",
             f"reward.batch_size={batch}")
        runs[name] = run
    a, b = (_losses(runs[n] / "reward" / "metrics.jsonl", "loss") for n in ("one", "two"))
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert json.loads((runs["two"] / "reward" / "metrics.json").read_text())["eval_pairs"] == 16


def assert_ppo_runs_match(one: Path, other: Path, sft: Path) -> None:
    """Two PPO runs of the same global batch logged the same figures and ended with the same weights, not SFT's."""
    from safetensors.torch import load_file

    logs = {n: [json.loads(x) for x in (r / "ppo" / "metrics.jsonl").read_text().splitlines()]
            for n, r in (("one", one), ("other", other))}
    assert [x["step"] for x in logs["one"]] == [x["step"] for x in logs["other"]] == [1, 2, 3], "each step once"
    assert [x["optimizer_steps"] for x in logs["other"]] == [2, 4, 6]
    for key in ("response_len", "score", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "grad_norm"):
        a, b = [x[key] for x in logs["one"]], [x[key] for x in logs["other"]]
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5), key
    assert len({x["response_len"] for x in logs["one"]}) > 1 or logs["one"][0]["response_len"] < 12, \
        "replies of different lengths: the global token count is exercised"
    m1, m2 = (json.loads((r / "ppo" / "metrics.json").read_text()) for r in (one, other))
    assert m1["eval_reward_before"] == pytest.approx(m2["eval_reward_before"], abs=1e-5)
    assert m1["eval_reward_after"] == pytest.approx(m2["eval_reward_after"], abs=1e-4)
    w1, w2 = (load_file(r / "ppo" / "model.safetensors") for r in (one, other))
    v1, v2 = (load_file(r / "ppo" / "value_head.safetensors") for r in (one, other))
    base = load_file(sft / "model.safetensors")
    moved = 0
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-5, k
        moved += int(not (w1[k] == base[k]).all())
    assert moved > len(w1) // 2, "the runs trained"
    assert v1.keys() == v2.keys() and all((v1[k] - v2[k]).abs().max() < 1e-5 for k in v1)


def test_ppo_two_processes_match_one(tmp_path, trained, ppo_one):
    """The same global batch on 1 and 2 processes gives the same replies, losses and final weights.

    Each reply is sampled from its own seed (its place in the iteration), the advantages are whitened over both
    processes' tokens and every loss is normalised by the global token count: what two ranks do together is what
    one does alone, up to float rounding (and the KL coefficient, which moves by each process's minibatch size as
    trlX v0.6.0's does: a few 1e-5 of its value here).
    """
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    run = tmp_path / "two"
    shutil.copytree(trained, run)
    _run([*TWO_PROCS, "ppo"], run, recipe_file, *PPO_TWO)
    assert_ppo_runs_match(ppo_one, run, trained / "sft")


def test_ppo_on_two_processes_writes_once_and_resumes_on_one(tmp_path, trained):
    """2 ranks share the rollouts and write each file once; killed mid-run, the stage resumes on 1 process."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    # 8 rollouts / batch 4 = 2 optimizer steps an iteration on each rank, on any number of ranks: 6 iterations.
    overrides = [*PPO, "ppo.total_steps=12"]
    proc = subprocess.Popen([*TWO_PROCS, "ppo", str(recipe_file), f"output_dir={run}", *TINY, *SFT, *REWARD,
                             *overrides], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            )
    ckpts = run / "ppo" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.05)
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)  # both ranks (torchrun starts them in their own groups) and the launcher
    proc.communicate()
    assert list(ckpts.glob("step-*/state.json")), "no checkpoint before the kill"
    lines = _losses(run / "ppo" / "metrics.jsonl", "step")
    assert lines == sorted(set(lines)), "each step logged once, by rank 0"
    assert manifest.read(run / "ppo")["status"] == "running"

    _run([*ONE_PROC, "ppo"], run, recipe_file, *overrides)
    m = manifest.read(run / "ppo")
    assert m["status"] == "complete" and m["resumed_from_step"] >= 1
    assert _losses(run / "ppo" / "metrics.jsonl", "step") == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "ppo" / "metrics.json").read_text())["steps"] == 6


def test_lora_for_sft_reward_and_ppo(tmp_path, trained):
    """LoRA variants of the three stages run on CPU and leave ordinary (merged) model folders."""
    from safetensors.torch import load_file

    from rlhfchat.train import ppo, reward, sft

    run = tmp_path / "run"
    shutil.copytree(trained / "data", run / "data")
    r = load_recipe(None, ["name=t", f"output_dir={run}", *TINY, *SFT, *REWARD, *PPO, "ppo.total_steps=2",
                           "sft.max_steps=4", "reward.max_steps=4", "sft.lora.enabled=true",
                           "reward.lora.enabled=true", "ppo.lora.enabled=true", "sft.lora.r=4",
                           "reward.lora.r=4", "ppo.lora.r=4", "ppo.reward_device=cpu"])
    sft.main(r)
    reward.main(r)
    ppo.main(r)
    for stage in ("sft", "reward", "ppo"):
        assert manifest.read(run / stage)["status"] == "complete"
        assert not (run / stage / "adapter_config.json").exists(), f"{stage}: adapters are merged"
        weights = load_file(run / stage / "model.safetensors")
        assert not any("lora" in k for k in weights), stage
    base = load_file(run / "base" / "model.safetensors")
    tuned = load_file(run / "sft" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (base[q] == tuned[q]).all(), "the merged LoRA update changed the attention weights"
    k = "model.layers.0.mlp.up_proj.weight"
    assert (base[k] == tuned[k]).all(), "modules outside target_modules are untouched"


def test_qlora_for_sft_reward_and_ppo(tmp_path, trained):
    """QLoRA (a 4-bit NF4 base under LoRA) trains on CPU in the three stages; saved folders are full precision."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra: pip install 'rlhfchat[qlora]'")
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from rlhfchat.lora import merged
    from rlhfchat.train import reward, sft
    from rlhfchat.train.ppo import PPO as PPOTrainer

    run = tmp_path / "run"
    shutil.copytree(trained / "data", run / "data")
    q = [f"{s}.lora.{k}" for s in ("sft", "reward", "ppo") for k in ("enabled=true", "quantize=4bit", "r=4")]
    r = load_recipe(None, ["name=t", f"output_dir={run}", *TINY, *SFT, *REWARD, *PPO, "sft.max_steps=4",
                           "reward.max_steps=4", "sft.logging_steps=1", *q])
    sft.main(r)
    reward.main(r)
    losses = _losses(run / "sft" / "metrics.jsonl", "loss")
    assert len(losses) == 4 and losses[-1] < losses[0], "gradients reach the adapters through the 4-bit layers"
    base = load_file(run / "base" / "model.safetensors")
    for stage in ("sft", "reward"):
        config = json.loads((run / stage / "config.json").read_text())
        assert "quantization_config" not in config, stage
        weights = load_file(run / stage / "model.safetensors")
        assert not any("lora" in k for k in weights) and all(w.is_floating_point() for w in weights.values())
    tuned = load_file(run / "sft" / "model.safetensors")
    q_proj, up_proj = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(base[q_proj], tuned[q_proj]), "the adapters are merged into the attention weights"
    # merged into the full-precision base reloaded from its folder, not into 4-bit-rounded weights
    assert torch.equal(base[up_proj], tuned[up_proj])

    # PPO: the 4-bit policy trains its adapters; the reference is the same network with the adapters disabled
    ppo = PPOTrainer.from_folders(run / "sft", run / "reward", r.ppo, seed=0)
    lm = ppo.unwrapped.lm
    assert isinstance(lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert ppo.reference.uses_adapter and ppo.reference.lm is None
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    exp, _ = ppo.make_experience([[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(16)])
    ppo.update(exp)
    after = dict(lm.named_parameters())
    assert before and all("lora_" in n for n in before)
    assert all(not torch.equal(p, after[n]) for n, p in before.items()), "every adapter weight moved"
    # what the PPO folder is to hold: the SFT weights plus the trained LoRA delta, in full precision
    layer = lm.get_base_model().model.layers[0].self_attn.q_proj
    expected = load_file(run / "sft" / "model.safetensors")[q_proj] + layer.get_delta_weight("default").float()
    out = merged(lm)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in out.modules())
    assert torch.allclose(out.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)


def test_qlora_errors_name_the_field(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhfchat.errors import RlhfchatError
    from rlhfchat.models import load_pretrained

    with pytest.raises(RlhfchatError, match=r"^override reward.lora.quantize=4bit: reward.lora.quantize: a 4bit base "
                                            r"trains only through LoRA"):
        load_recipe(None, ["reward.lora.quantize=4bit"])
    with pytest.raises(RlhfchatError, match=r"^override ppo.lora.quantize=8bit: ppo.lora.quantize: expected one of "
                                            r"'4bit'"):
        load_recipe(None, ["ppo.lora.enabled=true", "ppo.lora.quantize=8bit"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the qlora extra were not installed
    lora = load_recipe(None, ["sft.lora.enabled=true", "sft.lora.quantize=4bit"]).sft.lora
    with pytest.raises(RlhfchatError, match=r"^sft.lora.quantize: 4bit needs bitsandbytes; pip install"):
        load_pretrained(AutoModelForCausalLM, tiny_model_dir, torch.float32, lora, "sft.lora.quantize")
