"""SFT and reward stages on a tiny run: files of the contract, real learning, skip, and 2-process parity.

Resumes after kills, with the figures they report, are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfchat import manifest
from rlhfchat.config import load_recipe

pytestmark = pytest.mark.slow

TINY = ["base.tiny.vocab_size=400", "base.tiny.hidden_size=48", "base.tiny.intermediate_size=96",
        "base.tiny.num_hidden_layers=2", "base.tiny.num_attention_heads=2", "base.tiny.max_position_embeddings=128"]
SFT = ["sft.max_steps=12", "sft.learning_rate=3e-3", "sft.batch_size=8", "sft.save_steps=4", "sft.logging_steps=2",
       "sft.max_length=96"]
REWARD = ["reward.max_steps=16", "reward.learning_rate=2e-3", "reward.batch_size=8", "reward.save_steps=8",
          "reward.logging_steps=4", "reward.max_length=96"]


def _write_data(data_dir: Path) -> None:
    """Canonical records: sums answered right (chosen) or with a rude non-answer (rejected)."""
    rng = random.Random(0)
    data_dir.mkdir(parents=True)

    def q():
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return [{"role": "user", "content": f"What is {a} + {b}?"}], f"{a} + {b} = {a + b}."

    def write(name, recs):
        (data_dir / name).write_text("".join(json.dumps(r) + "\n" for r in recs))

    for split, n in (("train", 96), ("eval", 16)):
        write(f"sft.{split}.jsonl", [{"id": f"{split}{i}", "source": "t", "messages": p + [
            {"role": "assistant", "content": a}]} for i, (p, a) in enumerate(q() for _ in range(n))])
        write(f"preferences.{split}.jsonl", [{"id": f"{split}{i}", "source": "t", "prompt": p, "chosen": a,
                                              "rejected": "No. Ask someone else."}
                                             for i, (p, a) in enumerate(q() for _ in range(n))])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    _write_data(run / "data")
    return run


def recipe(run: Path, *extra: str):
    return load_recipe(None, ["name=t", f"output_dir={run}", *TINY, *SFT, *REWARD, *extra])


def test_sft_then_reward_write_the_contract_and_learn(run_dir):
    from safetensors.torch import load_file

    from rlhfchat.train import reward, sft

    r = recipe(run_dir)
    sft.main(r)
    out = run_dir / "sft"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.json",
                 "metrics.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 12 and m["eval_loss"] < 5.5  # random init is ~ln(400) = 6.0
    assert manifest.read(out)["status"] == "complete"
    # Every weight moved away from the base model's.
    base, tuned = load_file(run_dir / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    unchanged = [k for k in base if (base[k] == tuned[k]).all()]
    assert not unchanged

    reward.main(r)
    rm = json.loads((run_dir / "reward" / "metrics.json").read_text())
    assert rm["eval_accuracy"] >= 0.9 and rm["eval_pairs"] == 16
    cfg = json.loads((run_dir / "reward" / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    # Later stages read how to use these folders from the folders, not from other recipe sections: the reward
    # model's text length (scoring.json, what it was trained on) and the SFT weights' dtype (config.json).
    from rlhfchat.models import folder_dtype
    from rlhfchat.train.reward import RewardScorer

    assert json.loads((run_dir / "reward" / "scoring.json").read_text()) == {"max_length": 96}
    assert RewardScorer(run_dir / "reward").max_length == 96 and folder_dtype(out) == "float32"

    # Skipped when nothing changed: the manifest is not rewritten.
    before = (out / "manifest.json").read_text()
    sft.main(r)
    assert (out / "manifest.json").read_text() == before
    # A changed recipe section runs again.
    sft.main(recipe(run_dir, "sft.max_steps=4"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_two_processes_match_one(run_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 follows the loss of 1 process x batch 8."""
    import shutil

    two = tmp_path / "two"
    shutil.copytree(run_dir, two)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: t\n")
    common = [*TINY, *SFT, "sft.max_steps=6", "sft.logging_steps=1", "sft.save_steps=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "rlhfchat.cli", "sft", str(recipe_file), f"output_dir={run_dir}",
                          *common], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "cpu-2proc.yaml"
    two_run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                              "-m", "rlhfchat.cli", "sft", str(recipe_file), f"output_dir={two}", *common,
                              "sft.batch_size=4"], capture_output=True, text=True, env=env, timeout=300)
    # the ranks' own complaints first (an abort's "terminate called ..."), then the launcher's report
    said = [line for line in two_run.stderr.splitlines() if any(w in line for w in ("terminate", "Error", "abort"))]
    assert two_run.returncode == 0, "\n".join(said[:20]) + "\n" + two_run.stderr[-2000:]

    def losses(run):
        lines = [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if "loss" in x]

    a, b = losses(run_dir), losses(two)
    assert len(a) == len(b) == 6  # one line a step: rank 1 wrote nothing
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    # Files written once, by rank 0.
    assert sorted(p.name for p in (two / "sft").iterdir()) == sorted(p.name for p in (run_dir / "sft").iterdir())


def test_metrics_log_of_a_resumed_run_is_its_checkpoints_log(tmp_path):
    from rlhfchat.train import hf_stage

    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    history = [{"loss": 3.0, "epoch": 0.5, "step": 2}, {"loss": 2.0, "epoch": 1.0, "step": 4}]
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": history}))
    log = tmp_path / "metrics.jsonl"
    # what the killed attempt wrote past the checkpoint: a row, its summary, a line cut short by the kill
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0},
                                                             {"step": 6, "loss": 1.0},
                                                             {"step": 6, "train_loss": 2.0, "train_runtime": 1}])
                   + '{"step": 8, "lo')
    hf_stage.metrics_logger(log, ckpt)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [
        {"step": 2, "epoch": 0.5, "loss": 3.0}, {"step": 4, "epoch": 1.0, "loss": 2.0}]
    hf_stage.metrics_logger(log)  # a fresh start keeps nothing
    assert log.read_text() == ""


def test_mean_train_loss_counts_the_steps_before_the_resume():
    from rlhfchat.train.hf_stage import mean_train_loss

    log = [{"loss": 3.0, "step": 2}, {"loss": 2.0, "step": 4}, {"eval_loss": 9.0, "step": 4}]  # steps 1-4 sum to 10
    assert mean_train_loss(log, 0, 6, 1.7) == 1.7  # not resumed: the Trainer's own figure
    assert mean_train_loss(log, 4, 6, 1.5) == pytest.approx((10 + 2 * 1.5) / 6)  # resumed at 4: 2 steps of 1.5
    assert mean_train_loss(log, 4, 4, 0.0) == 2.5  # resumed from the final checkpoint: the Trainer says 0.0
    # a checkpoint at step 3 between two logs (older rlhfchat): step 3 is in no row and is left out of the mean
    assert mean_train_loss(log[:1], 3, 5, 1.0) == pytest.approx((6 + 2 * 1.0) / 4)
