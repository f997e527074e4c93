"""The one-command pipeline on the bundled sample data, at a size smaller than the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfchat import manifest, pipeline
from rlhfchat.config import load_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
SMALL = [
    "base.tiny.vocab_size=512", "base.tiny.hidden_size=48", "base.tiny.intermediate_size=96",
    "base.tiny.num_hidden_layers=2", "base.tiny.num_attention_heads=2",
    "sft.max_steps=6", "sft.batch_size=8", "sft.max_length=128", "sft.save_steps=3",
    "reward.max_steps=6", "reward.batch_size=8", "reward.max_length=128", "reward.save_steps=3",
    "ppo.num_rollouts=8", "ppo.chunk_size=8", "ppo.batch_size=8", "ppo.ppo_epochs=1", "ppo.total_steps=2",
    "ppo.generation.max_new_tokens=8", "ppo.eval_prompts=4", "ppo.save_steps=1",
    "eval.prompts=4", "eval.max_new_tokens=8", "eval.limit=2", "eval.bootstrap=50",
]
CONTRACT = {
    ".": ["recipe.yaml"],
    "data": ["sft.train.jsonl", "sft.eval.jsonl", "preferences.train.jsonl", "preferences.eval.jsonl",
             "prompts.train.jsonl", "prompts.eval.jsonl", "card.json", "manifest.json"],
    "sft": ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.json",
            "metrics.jsonl", "manifest.json"],
    "reward": ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.json",
               "metrics.jsonl", "manifest.json"],
    "ppo": ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "value_head.safetensors",
            "metrics.json", "metrics.jsonl", "manifest.json"],
    "eval": ["results.json", "report.md", "manifest.json"],
}


def test_pipeline_writes_the_contract_and_skips_when_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository
    out = tmp_path / "run"
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"output_dir={out}", *SMALL])
    pipeline.main(recipe)
    for folder, names in CONTRACT.items():
        for name in names:
            assert (out / folder / name).is_file(), f"{folder}/{name}"
    for stage in ("data", "base", "sft", "reward", "ppo", "eval"):
        assert manifest.read(out / stage)["status"] == "complete", stage
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["model"] for m in results["models"]][-2:] == ["sft", "ppo"]
    assert "ppo_vs_sft" in results["win_rates"]
    assert list((out / "eval").glob("*.png"))
    printed = capsys.readouterr().out
    assert f"serve --rounds {out}" in printed and "report.md" in printed

    # A second run skips every stage: no manifest is rewritten.
    before = {s: (out / s / "manifest.json").read_text() for s in ("data", "sft", "reward", "ppo", "eval")}
    pipeline.main(recipe)
    after = {s: (out / s / "manifest.json").read_text() for s in before}
    assert after == before
    assert capsys.readouterr().out.count("skipping") >= 4

    # Changing PPO's section re-runs PPO (and what follows) but not the stages before it.
    pipeline.main(load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"output_dir={out}", *SMALL,
                                                                  "ppo.init_kl_coef=0.2"]))
    assert (out / "sft" / "manifest.json").read_text() == before["sft"]
    assert (out / "ppo" / "manifest.json").read_text() != before["ppo"]
