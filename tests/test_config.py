"""Recipes: YAML onto dataclasses, overrides, and the errors a user sees for a wrong key or type."""

import os

import pytest
import yaml

from rlhfchat.config import Recipe, config_hash, dump_recipe, load_recipe
from rlhfchat.errors import RlhfchatError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_output_dir(tmp_path):
    r = load_recipe(write(tmp_path, "name: demo\n"))
    assert r.output_dir == os.path.abspath("runs/demo")  # the default run folder is in the current folder
    assert r.seed == 0
    # StableVicuna's PPO values are the defaults.
    assert (r.ppo.num_rollouts, r.ppo.chunk_size, r.ppo.ppo_epochs) == (128, 16, 4)
    assert (r.ppo.init_kl_coef, r.ppo.target, r.ppo.horizon) == (0.1, 6.0, 10000)
    assert (r.ppo.gamma, r.ppo.lam, r.ppo.cliprange, r.ppo.cliprange_value) == (1.0, 0.95, 0.2, 0.2)
    assert (r.ppo.vf_coef, r.ppo.cliprange_reward, r.ppo.top_k, r.ppo.top_p) == (1.0, 10.0, 0, 1.0)


def test_overrides_nested_lists_and_scientific_notation(tmp_path):
    p = write(tmp_path, "name: demo\ndata:\n  sft: [{source: alpaca, path: a.json}]\n")
    r = load_recipe(p, ["ppo.init_kl_coef=0.05", "output_dir=/tmp/x", "data.eval_fraction=0",
                        "sft.learning_rate=1e-3", "sft.lora.r=8", "eval.tasks=[a, b]", "ppo.target=null"])
    assert r.ppo.init_kl_coef == 0.05 and r.output_dir == "/tmp/x" and r.data.eval_fraction == 0.0
    assert r.sft.learning_rate == 1e-3 and r.sft.lora.r == 8 and r.eval.tasks == ["a", "b"]
    assert r.ppo.target is None
    assert r.data.sft[0].source == "alpaca" and r.data.sft[0].weight == 1.0


@pytest.mark.parametrize("text,overrides,message", [
    ("name: d\nppo: {kl: 1}\n", [], "ppo.kl: unknown key; valid keys: num_rollouts, chunk_size"),
    ("name: d\n", ["ppo.nope=1"], "ppo.nope: unknown key; valid keys: num_rollouts"),
    ("name: d\n", ["ppo.init_kl_coef=high"], "ppo.init_kl_coef: expected a number, got 'high'"),
    ("name: d\n", ["ppo.ppo_epochs=1.5"], "ppo.ppo_epochs: expected an integer, got 1.5"),
    ("name: d\n", ["sft.packing=maybe"], "sft.packing: expected true or false, got 'maybe'"),
    ("name: d\ndata: {sft: [{source: reddit, path: x}]}\n", [], "data.sft[0].source: unknown source 'reddit'"),
    ("name: d\ndata: {sft: [{path: x}]}\n", [], "data.sft[0].source: required key is missing"),
    ("name: d\n", ["seed"], "expected key=value"),
    ("name: d\n", ["seed.x=1"], "seed: is a int, it has no sub-keys"),
    ("name: d\ndata: {eval_fraction: 1.5}\n", [], "data.eval_fraction: expected a number in [0, 1)"),
    ("- a\n- b\n", [], "expected a mapping of recipe keys"),
    ("name: [unclosed\n", [], "line 2: invalid YAML"),
])
def test_errors_name_the_key(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(RlhfchatError) as e:
        load_recipe(p, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RlhfchatError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips_and_hash_is_stable(tmp_path):
    r = load_recipe(write(tmp_path, "name: demo\nseed: 3\n"), ["ppo.vf_coef=0.5"])
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r
    assert config_hash(r.ppo) == config_hash(again.ppo)
    assert config_hash(r.ppo) != config_hash(Recipe().ppo)
    assert yaml.safe_load(dump_recipe(r))["ppo"]["vf_coef"] == 0.5


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes, "recipes/ must ship at least the tiny demo"
    for p in recipes:
        load_recipe(p)


def test_paths_resolve_against_the_recipe_folder_and_are_saved_absolute(tmp_path, monkeypatch):
    """A recipe's relative paths are the recipe file's neighbours, wherever the command runs from; overrides are the
    current folder's; hub ids stay; the saved recipe holds absolute paths and loads the same from anywhere."""
    recipes = tmp_path / "project" / "recipes"
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "chats.jsonl").write_text("")
    (tmp_path / "project" / "my-base").mkdir()
    recipes.mkdir()
    p = recipes / "r.yaml"
    p.write_text("name: demo\noutput_dir: ../runs/demo\nbase: {model: ../my-base, chat_template: vicuna_v0}\n"
                 "data:\n  sft:\n    - {source: messages, path: ../data/chats.jsonl}\n"
                 "    - {source: oasst1, path: OpenAssistant/oasst1}\n"
                 "eval: {models: [Qwen/Qwen2.5-0.5B-Instruct]}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(p, ["data.prompts=[{source: prompts, path: mine.jsonl}]"])
    project = tmp_path / "project"
    assert r.output_dir == str(project / "runs" / "demo")
    assert r.base.model == str(project / "my-base") and r.base.chat_template == "vicuna_v0"
    assert [s.path for s in r.data.sft] == [str(project / "data" / "chats.jsonl"), "OpenAssistant/oasst1"]
    assert r.data.prompts[0].path == str(elsewhere / "mine.jsonl")  # an override: the current folder
    assert r.eval.models == ["Qwen/Qwen2.5-0.5B-Instruct"]
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_recipe(r))
    monkeypatch.chdir(tmp_path)
    assert load_recipe(saved) == r
