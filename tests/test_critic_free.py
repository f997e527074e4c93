"""The critic-free estimators and the reward components in the PPO loop (rlhfchat/train/ppo.py), on the tiny model.

    pytest tests/test_critic_free.py

The toy verifiable task (as verl keeps one): the reward is a function component, 1.0 when the reply contains the
word "answer" (tests/_toy_rewards.py), and a few tens of iterations of GRPO, and of PPO with its critic, must raise
it on held-out prompts from 1 in 32 to most of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlhfchat.data.schema import message, prompt_record, write_jsonl
from rlhfchat.train.ppo import PPO, main
from tests.test_ppo import run_dir, tiny_recipe  # noqa: F401  (run_dir: a fixture, with a reward model)

SAYS_ANSWER = 'ppo.rewards=[{kind: function, function: "tests._toy_rewards:says_answer"}]'
GRPO = ("ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4")


@pytest.fixture
def toy_run(tmp_path, tiny_model_dir) -> Path:
    """A run folder with sft/ and prompts but no reward/: a run whose rewards are all checks needs no reward model."""
    run = tmp_path / "toy"
    (run / "data").mkdir(parents=True)
    os.symlink(tiny_model_dir, run / "sft")
    write_jsonl(run / "data" / "prompts.train.jsonl",
                [prompt_record(f"t{i}", "t", [message("user", f"What is {i} + {i % 5}?")]) for i in range(32)])
    write_jsonl(run / "data" / "prompts.eval.jsonl",
                [prompt_record(f"e{i}", "t", [message("user", f"What is {i % 7} + {i}?")]) for i in range(32)])
    return run


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums from run to run, so figures and weights can match exactly
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_toy_task_rl_raises_a_checkable_reward(toy_run, one_thread, estimator):
    # 60 iterations of 16 samples (4 prompts x 4 replies for GRPO), 8 new tokens, lr 0.005: about 3 s each. Measured
    # (seed 0): held-out 1/32 -> 28/32 (grpo) and 1/32 -> 26/32 (gae); seed 1 gives 23/32 and 14/32.
    extra = GRPO if estimator == "grpo" else ()
    metrics = main(tiny_recipe(toy_run, SAYS_ANSWER, "ppo.num_rollouts=16", "ppo.chunk_size=16", "ppo.batch_size=16",
                               "ppo.total_steps=60", "ppo.epochs=100", "ppo.generation.max_new_tokens=8",
                               "ppo.eval_prompts=32", "ppo.save_steps=100", "ppo.learning_rate=0.005", *extra))
    before, after = metrics["eval_rewards_before"]["says_answer"], metrics["eval_rewards_after"]["says_answer"]
    # the held-out prompts, sampled as in the rollouts: at most 3 of 32 replies say it before, at least 16 after
    assert before <= 3 / 32 and after >= 0.5, (before, after)
    assert metrics["eval_reward_after"] == pytest.approx(after)  # the only component, weight 1
    train = [line["rewards/says_answer"] for line in _lines(toy_run)]
    assert len(train) == 60
    assert sum(train[:5]) / 5 <= 0.15 and sum(train[-10:]) / 10 >= 0.4, train  # and on the training rollouts
    assert metrics["advantage_estimator"] == estimator
    assert (toy_run / "ppo" / "value_head.safetensors").is_file() == (estimator == "gae")
    assert ("value_loss" in _lines(toy_run)[-1]) == (estimator == "gae")


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_critic_free_builds_no_value_head_and_no_critic(run_dir, kl_penalty):
    # share_trunk false would give gae a separate critic: critic-free, there is none, and nothing but the LM trains
    ppo = PPO.from_folders(run_dir / "sft", None, tiny_recipe(
        run_dir, SAYS_ANSWER, "ppo.share_trunk=false", "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2",
        f"ppo.kl_penalty={kl_penalty}").ppo, seed=0)
    assert ppo.unwrapped.value_head is None and ppo.unwrapped.critic is None and ppo.scorer is None
    lm_names = [f"lm.{n}" for n, _ in ppo.unwrapped.lm.named_parameters()]
    assert [n for n, _ in ppo.unwrapped.named_parameters()] == lm_names  # no head, no critic: nothing else
    assert ppo.unwrapped.value_state_dict() == {}
    records = [prompt_record(f"p{i}", "t", [message("user", f"What is {i} + 1?")]) for i in range(4)]
    with pytest.raises(ValueError, match="4 seeds for 4 prompts x 2 samples"):  # one seed per reply, not per prompt
        ppo.make_experience(records, seeds=list(range(4)))
    exp, stats = ppo.make_experience(records, seeds=list(range(8)))
    assert exp.values is None and exp.returns is None and exp.input_ids.shape[0] == 8  # 4 prompts x 2 replies
    assert "values" not in stats and "rewards/says_answer" in stats and "groups_without_signal" in stats
    update = ppo.update(exp)
    assert "value_loss" not in update and ("kl_loss" in update) == (kl_penalty == "loss")


def test_a_critic_free_run_resumes_from_its_checkpoint_exactly(toy_run, tmp_path, one_thread, monkeypatch):
    # save every iteration, fail in the 4th; the rerun resumes from step 3 and ends with the weights of a run that
    # never stopped, bit for bit
    recipe = ("ppo.num_rollouts=8", "ppo.chunk_size=8", "ppo.batch_size=8", "ppo.total_steps=6", "ppo.epochs=100",
              "ppo.save_steps=1", "ppo.kl_penalty=loss", "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4",
              SAYS_ANSWER)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("sft", "data"):
        os.symlink((toy_run / name).resolve(), fresh / name)
    main(tiny_recipe(fresh, *recipe))

    calls = {"n": 0}
    real_update = PPO.update

    def failing_update(self, exp):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("the machine went away")
        return real_update(self, exp)

    monkeypatch.setattr(PPO, "update", failing_update)
    with pytest.raises(RuntimeError, match="went away"):
        main(tiny_recipe(toy_run, *recipe))
    monkeypatch.setattr(PPO, "update", real_update)
    metrics = main(tiny_recipe(toy_run, *recipe))
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 6

    from safetensors.torch import load_file

    resumed, uninterrupted = load_file(toy_run / "ppo" / "model.safetensors"), load_file(fresh / "ppo" /
                                                                                          "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert [line["step"] for line in _lines(toy_run)] == list(range(1, 7))
    assert [line["rewards/says_answer"] for line in _lines(toy_run)] == [
        line["rewards/says_answer"] for line in _lines(fresh)]
    assert not (toy_run / "ppo" / "value_head.safetensors").exists()
    assert not any(p.name == "value_head.safetensors" for p in (toy_run / "ppo").rglob("*"))


def test_each_component_is_logged_and_the_score_is_their_weighted_sum(run_dir, one_thread):
    rewards = ('ppo.rewards=[{kind: reward_model, weight: 0.5}, {kind: math, weight: 2},'
               ' {kind: function, function: "tests._toy_rewards:says_answer", name: says, weight: -1}]')
    metrics = main(tiny_recipe(run_dir, rewards, "ppo.total_steps=2", "ppo.advantage_estimator=reinforce_pp",
                               "ppo.generation.max_new_tokens=8"))
    for line in _lines(run_dir):
        parts = {k: line[f"rewards/{k}"] for k in ("reward_model", "math", "says")}
        assert line["score"] == pytest.approx(0.5 * parts["reward_model"] + 2 * parts["math"] - parts["says"],
                                              abs=2e-6)  # metrics.jsonl rounds to 6 places
        assert 0.0 <= parts["math"] <= 1.0 and 0.0 <= parts["says"] <= 1.0
    for when in ("before", "after"):
        parts = metrics[f"eval_rewards_{when}"]
        assert set(parts) == {"reward_model", "math", "says"}
        assert metrics[f"eval_reward_{when}"] == pytest.approx(0.5 * parts["reward_model"] + 2 * parts["math"]
                                                               - parts["says"], abs=1e-6)
    saved = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    assert saved["eval_rewards_after"] == metrics["eval_rewards_after"]


@pytest.mark.parametrize("overrides, message", [
    (("ppo.advantage_estimator=grpo",), "ppo.samples_per_prompt: grpo compares the replies to one prompt; expected "
                                        "2 or more, got 1"),
    (("ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=3"),
     "ppo.num_rollouts: expected a multiple of ppo.samples_per_prompt (3), got 8"),
    (('ppo.rewards=[{kind: function, function: "tests._toy_rewards"}]',),
     "ppo.rewards[0].function: expected module:function (e.g. mypkg.rewards:brevity), got 'tests._toy_rewards'"),
    (('ppo.rewards=[{kind: math}, {kind: function, function: "tests._no_such_module:f"}]',),
     "ppo.rewards[1].function: cannot import 'tests._no_such_module'"),
    (('ppo.rewards=[{kind: function, function: "tests._toy_rewards:nothing"}]',),
     "ppo.rewards[0].function: module 'tests._toy_rewards' has no function 'nothing'"),
    (('ppo.rewards=[{kind: function, function: "tests._toy_rewards:not_a_float"}]',),
     "ppo.rewards[0].function: reward 'not_a_float' returned str 'yes' for prompt"),
])
def test_configuration_errors_are_one_line_naming_the_field(toy_run, tmp_path, capsys, overrides, message):
    from rlhfchat.cli import main as cli_main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {toy_run}\nppo:\n  num_rollouts: 8\n  chunk_size: 8\n  batch_size: 8\n"
                      "  total_steps: 1\n  generation: {max_new_tokens: 4}\n")
    assert cli_main(["ppo", str(recipe), *overrides]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not the progress bars
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (toy_run / "ppo" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("estimator, kl_penalty, layout", [("grpo", "loss", "ddp"), ("reinforce_pp", "reward", "ddp"),
                                                            ("grpo", "loss", "zero3"), ("rloo", "reward", "zero2")])
def test_critic_free_on_two_processes_matches_one(tmp_path, trained, estimator, kl_penalty, layout):
    """4 prompts x 2 replies an iteration: on one process, or 2 prompts' groups on each of two (a group never
    straddles processes; REINFORCE++ whitens over both processes' tokens), the same replies, figures and final
    weights, up to float rounding. zero2, zero3: DeepSpeed ZeRO-2 or -3 (configs/accelerate/cpu-zero{2,3}.yaml), each
    process's minibatch of 4 in 2 accumulated micro-batches of 2."""
    import shutil

    from safetensors.torch import load_file

    from tests.test_scale import ONE_PROC, PPO_PARITY, TWO_PROCS, _run
    from tests.test_zero import launcher

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    grpo = [*PPO_PARITY, f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2",
            f"ppo.kl_penalty={kl_penalty}"]
    runs = {}
    two = TWO_PROCS if layout == "ddp" else [*launcher(int(layout[-1])), "-m", "rlhfchat.cli"]
    micro = ["ppo.batch_size=2", "ppo.grad_accum=2"] if layout != "ddp" else []
    for name, cmd, per_process in (("one", ONE_PROC, 8), ("two", two, 4)):
        run = runs[name] = tmp_path / name
        shutil.copytree(trained, run)
        _run([*cmd, "ppo"], run, recipe_file, *grpo, f"ppo.num_rollouts={per_process}",
             f"ppo.batch_size={per_process}", *(micro if name == "two" else []))
    logs = {n: _lines(r) for n, r in runs.items()}
    assert [x["step"] for x in logs["one"]] == [x["step"] for x in logs["two"]] == [1, 2, 3]
    for key in ("response_len", "score", "rewards/reward_model", "kl", "kl_k3", "entropy", "policy_loss", "clipfrac",
                "groups_without_signal", "grad_norm", *(["kl_loss"] if kl_penalty == "loss" else [])):
        a, b = [x[key] for x in logs["one"]], [x[key] for x in logs["two"]]
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5), key
    assert "value_loss" not in logs["two"][-1]
    m1, m2 = (json.loads((r / "ppo" / "metrics.json").read_text()) for r in runs.values())
    assert m1["eval_reward_after"] == pytest.approx(m2["eval_reward_after"], abs=1e-4)
    w1, w2 = (load_file(r / "ppo" / "model.safetensors") for r in runs.values())
    base = load_file(trained / "sft" / "model.safetensors")
    assert all((w1[k] - w2[k]).abs().max() < 1e-5 for k in w1)
    assert sum(int(not torch.equal(w1[k], base[k])) for k in w1) > len(w1) // 2, "the runs trained"
    assert not any((r / "ppo" / "value_head.safetensors").exists() for r in runs.values())
