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
    assert (r.ppo.vf_coef, r.ppo.cliprange_reward, r.ppo.generation.top_k, r.ppo.generation.top_p) == (1.0, 10.0, 0, 1.0)


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


def _dataclasses_of(cls, seen=None):
    """Every dataclass a recipe holds (nested, and as list items), once each."""
    import dataclasses
    import typing

    from rlhfchat.typed import _nested

    seen = seen if seen is not None else []
    if cls in seen:
        return seen
    seen.append(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        for sub in (_nested(tp), inner):
            if sub is not None and dataclasses.is_dataclass(sub):
                _dataclasses_of(sub, seen)
    return seen


def test_every_recipe_field_is_documented():
    import dataclasses

    from rlhfchat.typed import field_docs

    missing = [f"{cls.__name__}.{f.name}" for cls in _dataclasses_of(Recipe) for f in dataclasses.fields(cls)
               if not field_docs(cls).get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"
    assert not hasattr(Recipe().ppo, "ref_mean")  # dead, removed


def test_each_stage_help_lists_its_fields_with_type_default_and_docstring(capsys):
    import dataclasses

    from rlhfchat import cli
    from rlhfchat.typed import field_docs

    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = capsys.readouterr().out
    for cls, prefix in ((type(Recipe().ppo), "ppo."), (type(Recipe().ppo.generation), "ppo.generation."),
                        (type(Recipe().ppo.vllm), "ppo.vllm.")):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(getattr(cls(), f.name)):
                continue
            assert f"\n{prefix}{f.name}: " in out, f.name
            first_words = " ".join(field_docs(cls)[f.name].split()[:4])
            assert first_words in " ".join(out.split()), (f.name, first_words)
    assert "ppo.generation.max_new_tokens: int = 128" in out and "ppo.target: float | None = 6.0" in out
    with pytest.raises(SystemExit):
        cli.main(["data", "--help"])
    assert "data.sft[i].path: str = (required)" in capsys.readouterr().out


def test_a_command_builds_only_its_own_options_and_help_still_lists_every_command():
    """`rlhfchat bench ppo` does not import what the chat commands' options need (sqlalchemy, asyncio: 20 MB of
    the bench's peak memory); `rlhfchat --help` names every command, and a chosen one still gets all its options."""
    import subprocess
    import sys

    from rlhfchat import cli

    code = ("import sys\nfrom rlhfchat import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('loaded:', 'sqlalchemy' in sys.modules, 'asyncio' in sys.modules, file=sys.stderr)")
    def run(*argv):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        return done.stdout, done.stderr

    out, loaded = run("bench", "ppo", "--help")
    assert "--samples-per-prompt G" in out and loaded.endswith("loaded: False False\n")
    out, loaded = run("feedback", "stats", "--help")
    assert "--db" in out and loaded.endswith("loaded: True True\n")  # the chosen command is built in full
    out, _ = run("--help")
    commands = [*cli.STAGES, "delta", "chat", "serve", "discord", "feedback", "iterate", "bench"]
    assert all(f"\n    {name} " in out for name in commands), out
    _, error = run("chta")
    assert "invalid choice" in error and "chta" in error and "serve" in error  # quoting varies by Python
    # the whole parser (no command named) still builds every option, for tools that read it
    full = cli.build_parser()
    assert full.parse_args(["bench", "ppo", "--policy", "p", "--reward", "r", "--prompts", "x.jsonl"]).batch == 16


def test_nested_sections_take_overrides_and_name_unknown_keys():
    r = load_recipe(None, ["ppo.generation.max_new_tokens=7", "ppo.vllm.sleep=false"])
    assert (r.ppo.generation.max_new_tokens, r.ppo.vllm.sleep) == (7, False)
    with pytest.raises(RlhfchatError, match="ppo.max_new_tokens: unknown key; valid keys: .*generation"):
        load_recipe(None, ["ppo.max_new_tokens=7"])
    with pytest.raises(RlhfchatError, match=r"ppo.vllm.gpu_memory_utilization: expected a number in \(0, 1\]"):
        load_recipe(None, ["ppo.vllm.gpu_memory_utilization=2"])


def test_the_grpo_demo_is_the_demo_with_grpo_on_the_math_check_alone():
    """recipes/tiny-cpu-grpo.yaml: the same data, base, SFT and reward sections as the demo (so its SFT model is the
    demo's), then GRPO in groups with the verifiable math reward as the only component (no reward model in RL)."""
    from pathlib import Path

    recipes = Path(__file__).parents[1] / "recipes"
    demo, grpo = load_recipe(recipes / "tiny-cpu.yaml"), load_recipe(recipes / "tiny-cpu-grpo.yaml")
    for section in ("data", "base", "sft", "reward", "dpo", "kto", "eval"):
        assert config_hash(getattr(grpo, section)) == config_hash(getattr(demo, section)), section
    assert grpo.seed == demo.seed and grpo.name != demo.name
    assert grpo.ppo.advantage_estimator == "grpo" and grpo.ppo.samples_per_prompt >= 2
    assert [c.kind for c in grpo.ppo.rewards] == ["math"]
    assert demo.ppo.advantage_estimator == "gae" and {c.kind for c in demo.ppo.rewards} == {"reward_model", "math"}


def test_an_error_names_what_set_the_field_an_override_or_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nppo: {learning_rate: 1.0e-5}\n")
    with pytest.raises(RlhfchatError, match=r"^override ppo.advantage_estimator=foo: ppo.advantage_estimator: "
                                            r"expected one of"):
        load_recipe(recipe, ["ppo.advantage_estimator=foo"])
    with pytest.raises(RlhfchatError, match=r"^override ppo.learning_rat=1: ppo.learning_rat: unknown key"):
        load_recipe(recipe, ["ppo.learning_rat=1"])
    # the field at fault (samples_per_prompt, 1 from the file's defaults) broken by an override of another: both named
    with pytest.raises(RlhfchatError, match=r"r.yaml with overrides ppo.advantage_estimator=grpo: "
                                            r"ppo.samples_per_prompt: grpo compares"):
        load_recipe(recipe, ["ppo.advantage_estimator=grpo"])
    recipe.write_text("name: t\nppo: {advantage_estimator: foo}\n")
    with pytest.raises(RlhfchatError, match=r"r.yaml with overrides seed=1: ppo.advantage_estimator: expected one of"):
        load_recipe(recipe, ["seed=1"])
