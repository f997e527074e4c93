"""Issue 17 on CPU: SFT, reward and PPO under DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (configs/accelerate/
cpu-zero2.yaml, cpu-zero3.yaml; cpu-zero3.json partitions every parameter, however small).

One launch per stage runs SFT and reward from the base of `trained`, PPO from `trained`'s models, and (ZeRO-3) a probe
of the frozen networks; each is compared with the one-process run of the same global batch. ZeRO-3 PPO then is
killed with SIGKILL after its first checkpoint, resumed on 2 processes (the same weights as the uninterrupted run) and,
from a copy, on 1 process.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfchat import manifest
from tests.test_scale import ENV, ONE_PROC, PPO_TWO, REWARD, ROOT, SFT, TINY, _losses, _run, assert_ppo_runs_match

pytestmark = pytest.mark.slow


def launcher(stage: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"cpu-zero{stage}.yaml")]


# The ZeRO-3 PPO run accumulates 2 micro-batches of 2 per process: minibatches of 4 x 2 processes, as PPO_ONE's 8.
PPO_ZERO = {2: PPO_TWO, 3: [*PPO_TWO, "ppo.batch_size=2", "ppo.grad_accum=2"]}
SETTINGS = [*TINY, *SFT, *REWARD]
HALF_BATCH = ["sft.batch_size=4", "reward.batch_size=4"]  # on each of 2 processes: `trained`'s batches of 8


def _launch_stages(tmp_path: Path, trained: Path, stage: int) -> tuple[Path, Path, Path]:
    """sft + reward (run A, from trained's base and data) and ppo (run B, from trained's models) in one launch."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained, a, ignore=shutil.ignore_patterns("sft", "reward"))
    shutil.copytree(trained, b)
    probe = tmp_path / "probe.pt"
    ppo = [*SETTINGS, *PPO_ZERO[stage]]
    spec = {"runs": [["sft", str(a), [*SETTINGS, *HALF_BATCH]], ["reward", str(a), [*SETTINGS, *HALF_BATCH]],
                     ["ppo", str(b), ppo]],
            "probe": {"run": str(trained), "out": str(probe)} if stage == 3 else None,
            "reload": {"run": str(b), "overrides": ppo, "out": str(tmp_path / "reload.json")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = subprocess.run([*launcher(stage), str(ROOT / "tests" / "_zero_stages.py"), str(tmp_path / "spec.json")],
                         capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return a, b, probe


def _assert_stage_matches(stage: str, ours: Path, one: Path, auto_cls, key: str) -> None:
    """The same losses as the one-process stage, each step logged once, and a folder plain transformers loads with the
    trained weights (the one-process run's, not the stage's starting point)."""
    a, b = _losses(one / stage / "metrics.jsonl", key), _losses(ours / stage / "metrics.jsonl", key)
    assert len(b) >= 3 and a == pytest.approx(b, rel=1e-3, abs=1e-4), stage
    lines, one_lines = ((p / stage / "metrics.jsonl").read_text().splitlines() for p in (ours, one))
    assert len(lines) == len(set(lines)) == len(one_lines), f"{stage}: each line written once, by rank 0"
    assert manifest.read(ours / stage)["status"] == "complete"
    model, reference = (auto_cls.from_pretrained(str(p / stage)) for p in (ours, one))
    start = dict(auto_cls.from_pretrained(str(one / ("base" if stage == "sft" else "sft"))).named_parameters())
    for name, p in model.named_parameters():
        assert p.shape == reference.get_parameter(name).shape, name
        torch.testing.assert_close(p, reference.get_parameter(name), rtol=1e-3, atol=1e-4, msg=name)
    moved = [n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])]
    assert len(moved) > len(start) // 2, f"{stage}: trained weights, not the starting point"


@pytest.mark.parametrize("stage", [2, 3])
def test_stages_under_zero_match_one_process(tmp_path, trained, ppo_one, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    a, b, probe = _launch_stages(tmp_path, trained, stage)
    _assert_stage_matches("sft", a, trained, AutoModelForCausalLM, "loss")
    _assert_stage_matches("reward", a, trained, AutoModelForSequenceClassification, "loss")
    assert_ppo_runs_match(ppo_one, b, trained / "sft")
    for folder in (a / "sft", a / "reward", b / "ppo", b / "ppo" / "checkpoints"):  # no temporary file left over
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], folder
    # the last checkpoint, loaded on this layout (its own partitions of each tensor) and gathered again, is the files
    reloaded = json.loads((tmp_path / "reload.json").read_text())
    assert reloaded["same_names"] and reloaded["equal"], reloaded
    assert reloaded["checkpoint"] == "step-000003" and reloaded["step"] == reloaded["saved_step"] == 6
    if stage == 3:  # the reference and the reward model, partitioned on both ranks, compute what they do whole
        from tests._zero_stages import probe as probe_here

        result, whole = torch.load(probe), probe_here(trained)
        sharded, reward_whole = result["sharded"], result["reward_whole"]
        assert sharded["partitioned"] and not whole["partitioned"]
        assert not reward_whole["reward_partitioned"], "ppo.reward_device: loaded whole, outside DeepSpeed"
        for got in (sharded, reward_whole):
            torch.testing.assert_close(got["ref_logprobs"], whole["ref_logprobs"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["scores"], whole["scores"], rtol=1e-5, atol=1e-5)
        assert whole["ref_logprobs"].abs().sum() > 0


def test_zero3_ppo_killed_resumes_to_the_same_weights_and_on_one_process(tmp_path, trained):
    """SIGKILL after the first checkpoint; the rerun under ZeRO-3 ends with the weights of an uninterrupted run; the
    same checkpoint resumes on 1 process too (its weights and optimizer moments, gathered from both ranks, load)."""
    from safetensors.torch import load_file

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    overrides = [*PPO_ZERO[3], "ppo.save_steps=1"]
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    for run in runs.values():
        shutil.copytree(trained, run)
    cmd = [*launcher(3), "-m", "rlhfchat", "ppo"]
    _run(cmd, runs["whole"], recipe_file, *overrides)

    killed = runs["killed"]
    proc = subprocess.Popen([*cmd, str(recipe_file), f"output_dir={killed}", *SETTINGS, *overrides], env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "ppo" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.05)
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)  # both ranks and the launcher
    proc.communicate()
    assert manifest.read(killed / "ppo")["status"] == "running"
    (ckpt,) = [p.parent for p in ckpts.glob("step-*/state.json")]
    assert ckpt.name != "step-000003", "killed before the end"
    # The checkpoint is whole: every trainable tensor at full size, with its moments, gathered from both ranks.
    weights, moments = (load_file(ckpt / f) for f in ("trainable.safetensors", "optimizer.safetensors"))
    sft = load_file(trained / "sft" / "model.safetensors")
    assert all(weights["lm." + k].shape == sft[k].shape for k in sft)
    assert set(moments) == {f"{k}.{m}" for k in weights for m in ("exp_avg", "exp_avg_sq")}
    assert all(moments[f"{k}.exp_avg_sq"].abs().sum() > 0 for k in weights)
    on_one = tmp_path / "on_one"
    shutil.copytree(killed, on_one)

    _run(cmd, killed, recipe_file, *overrides)
    assert manifest.read(killed / "ppo")["resumed_from_step"] >= 1
    assert _losses(killed / "ppo" / "metrics.jsonl", "step") == [1, 2, 3]
    w1, w2 = (load_file(r / "ppo" / "model.safetensors") for r in (runs["whole"], killed))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the resumed run ends where the uninterrupted one does"
    final = load_file(runs["whole"] / "ppo" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all(torch.equal(final["lm." + k], w1[k]) for k in w1), "the checkpoint holds the trained weights"

    _run(ONE_PROC + ["ppo"], on_one, recipe_file, *overrides)
    m = manifest.read(on_one / "ppo")
    assert m["status"] == "complete" and m["resumed_from_step"] == int(ckpt.name.split("-")[1])
    assert json.loads((on_one / "ppo" / "metrics.json").read_text())["steps"] == 3
