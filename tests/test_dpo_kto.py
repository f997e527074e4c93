"""DPO and KTO (TRL's trainers) as stages and as the pipeline's `method: dpo | kto` routes, on tiny runs.

The KTO route runs end to end here (the DPO route runs end to end in test_iterate.py, as round 1 of the loop), on
sources in the standard formats: sums answered (chosen) or refused (rejected), as tests/test_stages.py writes them.
Both stages are checked for their files, for learning (the implicit reward margin TRL reports, and rlhfchat's own
log-prob gap between the chosen and the rejected reply of each held-out pair, read from the saved folders), for
skipping, and DPO for resuming after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfchat import manifest, pipeline
from rlhfchat.cli import main as cli
from rlhfchat.config import load_recipe
from rlhfchat.data.schema import read_jsonl, unpaired
from tests.test_stages import REWARD, SFT, TINY

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).parents[1]
FAST = [f"{m}.{k}" for m in ("dpo", "kto") for k in (
    "max_steps=8", "learning_rate=2e-3", "batch_size=8", "max_length=96", "save_steps=4", "logging_steps=2")]
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.json",
               "metrics.jsonl", "manifest.json"]


def write_sources(folder: Path) -> Path:
    """Sums answered or refused, in the standard formats (messages, preferences, prompts); returns the recipe."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)

    def q():
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."

    rows = [q() for _ in range(120)]
    (folder / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n" for p, a in rows))
    rows = [q() for _ in range(120)]
    (folder / "prefs.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "chosen": a, "rejected": "No. Ask someone else."}) + "\n" for p, a in rows))
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q()[0]}) + "\n" for _ in range(40)))
    recipe = folder / "sums.yaml"
    recipe.write_text("name: sums\noutput_dir: run\ndata:\n  eval_fraction: 0.15\n"
                      "  sft: [{source: messages, path: sft.jsonl}]\n"
                      "  preferences: [{source: preferences, path: prefs.jsonl}]\n"
                      "  prompts: [{source: prompts, path: prompts.jsonl}]\n")
    return recipe


def tiny_recipe(recipe: Path, *extra: str):
    return load_recipe(recipe, [*TINY, *SFT, *REWARD, *FAST, "eval.prompts=8", "eval.max_new_tokens=8",
                                "eval.tasks=[]", "eval.bootstrap=50", *extra])


@pytest.fixture(scope="module")
def sums(tmp_path_factory, one_torch_thread) -> Path:
    """The recipe file of the sums run, after the tiny pipeline went through the KTO route
    (data -> sft -> kto -> reward -> eval -> report) in its run folder, `run/` beside it."""
    recipe = write_sources(tmp_path_factory.mktemp("sums"))
    pipeline.main(tiny_recipe(recipe, "method=kto"))
    return recipe


@pytest.fixture
def kto_run(sums) -> Path:
    return sums.parent / "run"


def logp_gaps(model_dir: Path, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under the model, each reply scored after its prompt as the chat
    template renders them (rlhfchat's own measure, not TRL's)."""
    from rlhfchat.data.chat_format import assistant_token_mask
    from rlhfchat.eval.generate import load_causal_lm, sequence_logprobs

    model, tok = load_causal_lm(model_dir)

    def split(prompt, reply):
        ids, mask = assistant_token_mask(tok, prompt + [{"role": "assistant", "content": reply}])
        first = mask.index(1)
        return ids[:first], ids[first:]

    def score(key):
        parts = [split(p["prompt"], p[key]) for p in pairs]
        return sequence_logprobs(model, [a for a, _ in parts], [b for _, b in parts], pad_id=tok.pad_token_id)

    return [c - r for c, r in zip(score("chosen"), score("rejected"))]


def mean(xs):
    return sum(xs) / len(xs)


def test_kto_route_runs_end_to_end_learns_and_skips(sums, kto_run, capsys):
    for stage in ("data", "base", "sft", "kto", "reward", "eval"):
        assert manifest.read(kto_run / stage)["status"] == "complete", stage
    assert not (kto_run / "ppo").exists() and not (kto_run / "dpo").exists()
    for name in MODEL_FILES:
        assert (kto_run / "kto" / name).is_file(), name
    # The policy moved towards the chosen replies of the held-out pairs: TRL's margin, and our own log-prob gap.
    metrics = json.loads((kto_run / "kto" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["eval_margin"] > 0
    held_out = list(read_jsonl(kto_run / "data" / "preferences.eval.jsonl"))
    before, after = logp_gaps(kto_run / "sft", held_out), logp_gaps(kto_run / "kto", held_out)
    assert mean(after) > mean(before) + 1.0, (mean(before), mean(after))
    # Eval compares the run's models, with KL(kto || sft) and the win rate over SFT; the report has KTO's curve.
    results = json.loads((kto_run / "eval" / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert list(rows) == ["base", "sft", "kto"] and "kto_vs_sft" in results["win_rates"]
    assert rows["kto"]["kl_reference"] == "sft" and rows["kto"]["kl_to_ref"] is not None
    report = (kto_run / "eval" / "report.md").read_text()
    assert "kto_margin.png" in report and (kto_run / "eval" / "kto_margin.png").is_file()
    assert "- kto: train_loss" in report

    # The same command again skips every stage.
    stamps = {s: (kto_run / s / "manifest.json").read_text() for s in ("data", "sft", "kto", "reward", "eval")}
    capsys.readouterr()
    pipeline.main(tiny_recipe(sums, "method=kto"))
    assert {s: (kto_run / s / "manifest.json").read_text() for s in stamps} == stamps
    assert capsys.readouterr().out.count("skipping") == 5


def test_dpo_stage_learns_and_kto_takes_unpaired_thumbs(sums, kto_run):
    from rlhfchat.train import dpo, kto

    recipe = tiny_recipe(sums, "method=dpo")
    result = dpo.main(recipe)  # every stage returns its figures
    out = kto_run / "dpo"
    for name in MODEL_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert result == metrics
    assert metrics["steps"] == 8 and metrics["eval_margin"] > 0 and metrics["eval_accuracy"] > 0.6
    held_out = list(read_jsonl(kto_run / "data" / "preferences.eval.jsonl"))
    before, after = logp_gaps(kto_run / "sft", held_out), logp_gaps(out, held_out)
    assert mean(after) > mean(before) + 1.0, (mean(before), mean(after))
    assert sum(a > b for a, b in zip(after, before)) >= 0.8 * len(held_out)  # moved towards chosen on most pairs
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == [2, 4, 6, 8]
    stamp = (out / "manifest.json").read_text()
    dpo.main(recipe)
    assert (out / "manifest.json").read_text() == stamp  # skipped

    # With LoRA the reference is the SFT model under the disabled adapters (TRL's way, given no ref_model); the
    # saved folder is a plain model with the adapters merged in, moved away from the SFT weights.
    from safetensors.torch import load_file

    dpo.main(tiny_recipe(sums, "method=dpo", "dpo.lora.enabled=true", "dpo.lora.r=4", "dpo.learning_rate=1e-2"))
    assert json.loads((out / "metrics.json").read_text())["eval_margin"] > 0
    assert not (out / "adapter_config.json").exists()
    merged, base = load_file(out / "model.safetensors"), load_file(kto_run / "sft" / "model.safetensors")
    assert merged.keys() == base.keys()
    moved = {k for k in base if not (merged[k] == base[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                         for k in moved)

    # KTO also learns from single thumbed replies: a data/unpaired.train.jsonl file is an input of the stage.
    thumbs = [unpaired(f"t{i}", "feedback", [{"role": "user", "content": f"What is {i} + 1?"}], f"{i + 1}.", True)
              for i in range(5)]
    before_examples = json.loads((kto_run / "kto" / "metrics.json").read_text())["train_examples"]
    (kto_run / "data" / "unpaired.train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in thumbs))
    kto.main(tiny_recipe(sums, "method=kto"))
    assert json.loads((kto_run / "kto" / "metrics.json").read_text())["train_examples"] == before_examples + 5
    assert "data/unpaired.train.jsonl" in manifest.read(kto_run / "kto")["inputs"]


def test_dpo_resumes_after_kill(kto_run, tmp_path):
    """Kill the DPO process after its first checkpoint; the rerun resumes from it and ends at the same step."""
    run = tmp_path / "run"
    for folder in ("data", "base", "sft"):
        shutil.copytree(kto_run / folder, run / folder)
    (run / "data" / "unpaired.train.jsonl").unlink(missing_ok=True)
    args = [sys.executable, "-m", "rlhfchat.cli", "dpo", str(kto_run / "recipe.yaml"), f"output_dir={run}",
            "method=dpo", "dpo.max_steps=20", "dpo.save_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = run / "dpo" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpt.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert list(ckpt.glob("checkpoint-*")), "no checkpoint appeared before the kill"
    assert manifest.read(run / "dpo")["status"] == "running"

    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    m = manifest.read(run / "dpo")
    assert m["status"] == "complete" and m["resumed_from"].startswith("checkpoints/checkpoint-")
    assert m["attempts"] == 2
    assert json.loads((run / "dpo" / "metrics.json").read_text())["steps"] == 20
    logs = [json.loads(x) for x in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [d["step"] for d in logs if "loss" in d]
    assert steps and steps == sorted(set(steps))  # lines past the checkpoint were dropped, not logged twice


@pytest.mark.parametrize("args,message", [
    (["pipeline", "{recipe}"], "method: expected one of 'ppo', 'dpo', 'kto', got 'rlhf'"),
    (["dpo", "{plain}", "method=sft"], "method: expected one of 'ppo', 'dpo', 'kto', got 'sft'"),
    (["kto", "{plain}", "kto.batch_size=1"], "kto.batch_size: the kto loss estimates its KL term within a batch"),
    (["dpo", "{plain}", "dpo.loss_type=dop"], "dpo.loss_type: expected one of 'sigmoid', 'hinge', 'ipo'"),
    (["dpo", "{plain}"], "run/sft: not found; run `rlhfchat sft RECIPE.yaml` first"),
])
def test_wrong_method_or_missing_input_is_a_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("name: t\nmethod: rlhf\n")
    (tmp_path / "plain.yaml").write_text(f"name: t\noutput_dir: {tmp_path / 'run'}\n")
    argv = [a.format(recipe=tmp_path / "bad.yaml", plain=tmp_path / "plain.yaml") for a in args]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_iterate_makes_a_ppo_round_from_a_kto_round(sums, kto_run):
    """`method: ppo` in the loop: the reward model retrained from round 1's on the votes, then PPO from round 1's
    policy (here KTO's) against it."""
    from rlhfchat import rounds
    from rlhfchat.chat.feedback import FeedbackStore

    store = FeedbackStore(kto_run.parent / "feedback.db")
    ppo = ["ppo.num_rollouts=8", "ppo.chunk_size=8", "ppo.batch_size=8", "ppo.ppo_epochs=1", "ppo.total_steps=2",
           "ppo.generation.max_new_tokens=8", "ppo.eval_prompts=4", "ppo.save_steps=1"]
    assert rounds.iterate(tiny_recipe(sums, "method=kto"), store.url) is None  # round 1 recorded, no feedback yet
    for rec in list(read_jsonl(kto_run / "data" / "prompts.train.jsonl"))[:12]:
        a, b = (int(x) for x in rec["prompt"][-1]["content"].removeprefix("What is ").rstrip("?").split(" + "))
        conv = store.new_conversation("arena")
        good = store.add_reply(conv, model="kto", prompt=rec["prompt"], content=f"{a} + {b} = {a + b}.", sampling={})
        bad = store.add_reply(conv, model="sft", prompt=rec["prompt"], content="No. Ask someone else.", sampling={})
        store.arena_vote(bad, good, "b")
    r2 = rounds.iterate(tiny_recipe(sums, "method=ppo", *ppo), store.url)
    store.close()
    assert r2 == kto_run / "rounds" / "2"
    info = rounds.read_round(kto_run, 2)
    assert (info["method"], info["status"], info["feedback"]["preference_records"]) == ("ppo", "complete", 12)
    assert (r2 / "ppo" / "value_head.safetensors").is_file()
    # votes on a held-out prompt (of 100 sums, some repeat) or repeating a recipe pair are left out
    card = json.loads((r2 / "data" / "card.json").read_text())
    assert card["feedback_pairs"] == 12 and card["feedback_pairs_used"] >= 1
    assert card["feedback_pairs_used"] + sum(card["feedback_left_out"].values()) == 12
    assert str(kto_run / "reward") in manifest.read(r2 / "reward")["inputs"]  # retrained from round 1's
    assert manifest.read(r2 / "sft")["source"] == "kto"
    rows = {r["model"]: r for r in json.loads((r2 / "eval" / "results.json").read_text())["models"]}
    assert list(rows) == ["round-1", "round-2"] and rows["round-2"]["kl_reference"] == "round-1"
    assert rounds.latest(kto_run) == [r2 / "ppo", kto_run / "kto"]


@pytest.mark.parametrize("command", ["dpo", "kto"])
@pytest.mark.parametrize("unfinished", ["data", "sft"])
def test_dpo_and_kto_refuse_an_unfinished_input_folder(tmp_path, capsys, command, unfinished):
    run = tmp_path / "run"
    for stage in ("data", "sft"):
        (run / stage).mkdir(parents=True)
        status = "running" if stage == unfinished else "complete"
        (run / stage / "manifest.json").write_text(json.dumps({"stage": stage, "status": status}))
    (run / "sft" / "config.json").write_text("{}")
    for split in ("train", "eval"):
        (run / "data" / f"preferences.{split}.jsonl").write_text("")
    (tmp_path / "r.yaml").write_text(f"name: t\noutput_dir: {run}\n")
    assert cli([command, str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / unfinished}: incomplete") and err.count("\n") == 1, err
    assert not (run / command).exists()
