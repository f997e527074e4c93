"""The README's "Your model, your data", followed step by step offline, and the CLI's silenced library noise.

    pytest tests/test_your_model.py

The README steps run as written (`rlhfchat` as `python -m rlhfchat.cli`) in a copy of the recipe and the example
files, with HF_HUB_OFFLINE=1: the data step works, and the step that would download the model stops with the one
line the README shows. The noise test runs a real command twice, quiet and `--verbose`, in subprocesses: libraries
configure their logging once per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _blocks(section: str, lang: str) -> list[str]:
    """The fenced code blocks of `section` in language `lang` ("" for none), in order."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M) if tag == lang]


@pytest.mark.slow
def test_the_readme_section_is_true_offline_up_to_the_download(tmp_path):
    section = _section("Your model, your data")
    steps = [line.split("  #")[0].strip() for line in _blocks(section, "bash")[0].splitlines() if line.strip()]
    assert steps[0] == "rlhfchat data recipes/your-model.yaml"
    error = _blocks(section, "")[-1].strip()  # the one line the README says the download step stops with
    # The recipe shown in the README is the recipe in recipes/ (its three sources and its base)
    shown = _blocks(section, "yaml")[0]
    recipe = (ROOT / "recipes" / "your-model.yaml").read_text()
    for line in shown.splitlines():
        key = line.split("#")[0].strip()
        if key.startswith(("model:", "chat_template:")):
            assert key in recipe, key
        elif key.startswith(("sft:", "preferences:", "prompts:")):
            source = re.search(r"\{(.*)\}", key).group(1)
            assert source in recipe.replace("- {", "{"), source
    # a fresh folder holding what the README's steps read: the recipe and the example files
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "your-model.yaml", tmp_path / "recipes")
    shutil.copytree(ROOT / "data" / "examples", tmp_path / "data" / "examples")
    for step in steps:
        command = step.replace("rlhfchat ", f"{sys.executable} -m rlhfchat.cli ", 1)
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            break
    else:
        pytest.fail("every step ran offline; the README says one needs the hub")
    assert step.startswith("rlhfchat pipeline"), (step, done.stderr)
    assert done.returncode == 2 and done.stderr == error + "\n", done.stderr  # one line, no library noise
    # what the data step wrote, from the example files
    data = tmp_path / "runs" / "your-model" / "data"
    card = json.loads((data / "card.json").read_text())
    assert {k: card[k]["train"] + card[k]["eval"] for k in ("sft", "preferences", "prompts")} == \
        {"sft": 10, "preferences": 10, "prompts": 10}
    first = json.loads((data / "sft.train.jsonl").read_text().splitlines()[0])
    assert first["source"] == "messages" and first["messages"][-1]["role"] == "assistant"
    assert not (tmp_path / "runs" / "your-model" / "sft").exists() or not any(
        (tmp_path / "runs" / "your-model" / "sft").glob("*.safetensors"))


def _has_avx512bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_library_noise_is_silenced_unless_verbose(tmp_path, tiny_model_dir, tiny_reward_dir):
    """`bench ppo` with a separate critic and LoRA: it imports bitsandbytes (through peft), DeepSpeed (through
    accelerate) and loads a critic trunk from a causal-LM folder (transformers' LOAD REPORT)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    args = ["bench", "ppo", "--policy", str(tiny_model_dir), "--reward", str(tiny_reward_dir), "--prompts",
            str(prompts), "--batch", "2", "--new-tokens", "2", "--rollouts", "1", "--ppo-epochs", "1", "--minibatch",
            "2", "--separate-critic", "--lora", "--threads", "1"]
    runs = {}
    for flag in ([], ["--verbose"]):
        done = subprocess.run([sys.executable, "-m", "rlhfchat.cli", *flag, *args], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == 2
        runs[bool(flag)] = done.stdout + done.stderr
    # transformers' table is always there (the critic's trunk from a causal-LM folder); the rest depends on what is
    # installed and which versions: each, where --verbose shows it, is silenced without
    assert "LOAD REPORT" in runs[True]
    shown = [text for text in NOISE if text in runs[True]]
    assert [text for text in shown if text in runs[False]] == [], shown
    if importlib.util.find_spec("bitsandbytes") and _has_avx512bf16():  # its optional CPU kernel is tried only there
        assert "Failed to load CPU gemm_4bit_forward" in shown


NOISE = ["LOAD REPORT", "Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU", "FutureWarning",
         "DeprecationWarning", "UserWarning"]
"""What the libraries underneath print that means nothing to a user of `rlhfchat`."""
