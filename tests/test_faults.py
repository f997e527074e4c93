"""Faults in the stages (issue 18): a run resumed after SIGKILLs reports the figures of an uninterrupted one, every
stage and `delta apply` removes what a killed attempt left, and every stage refuses an input folder whose stage has
not finished.

    .venv/bin/python -m pytest tests/test_faults.py -q

The kills are real: `tests/_faults.py` runs the command in a subprocess and SIGKILLs it at a chosen point (right
after a Trainer checkpoint, or inside an atomic write, after its temporary is complete and before the rename).
The runs compared with the killed ones run in this process on one thread, as the killed ones do
(OMP_NUM_THREADS=1), so that the float sums are the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfchat import atomic, manifest
from rlhfchat.cli import main as cli_main
from rlhfchat.delta import _one_thread as one_thread  # as the killed processes run (OMP_NUM_THREADS=1)
from tests.test_pipeline import SMALL
from tests.test_stages import REWARD, SFT, TINY, _write_data, recipe

ROOT = Path(__file__).parents[1]
HELPER = Path(__file__).parent / "_faults.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second"}


def kill(faults: str, *command: str, cwd: Path | None = None) -> None:
    """Run `rlhfchat COMMAND...` with `faults` (see tests/_faults.py); it must die of the SIGKILL."""
    out = subprocess.run([sys.executable, str(HELPER), faults, *command], capture_output=True, text=True, env=ENV,
                         timeout=300, cwd=cwd)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]


def stage_command(stage: str, run: Path, *extra: str) -> list[str]:
    recipe_file = run.parent / f"{run.name}.yaml"
    recipe_file.write_text("name: t\n")
    return [stage, str(recipe_file), f"output_dir={run}", "name=t", *TINY, *SFT, *REWARD, *extra]


def stale(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if atomic.is_temporary(p.name))


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def assert_same_figures(resumed: Path, uninterrupted: Path) -> None:
    """metrics.json and metrics.jsonl of a resumed stage folder equal an uninterrupted one's (but for timings)."""
    a, b = rows(resumed / "metrics.jsonl"), rows(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [sorted(r) for r in a] == [sorted(r) for r in b]  # the same rows: none twice, none missing
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6), x["step"]
    assert sum("train_loss" in r for r in a) == 1
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (resumed, uninterrupted))
    assert ma == pytest.approx(mb, rel=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """data, sft and reward of the tiny run, without faults, on one thread."""
    from rlhfchat.train import reward, sft

    run = tmp_path_factory.mktemp("faults") / "ref"
    _write_data(run / "data")
    with one_thread():
        sft.main(recipe(run))
        reward.main(recipe(run))
    return run


@pytest.mark.slow
def test_sft_killed_mid_run_at_the_final_checkpoint_and_at_the_final_save_reports_true_figures(
        uninterrupted, tmp_path):
    from rlhfchat.train import sft

    run = tmp_path / "run"
    _write_data(run / "data")
    command = stage_command("sft", run)
    kill("state=2", *command)  # checkpoint-4 of 12 whole; checkpoint-8 cut short in its last file
    assert sorted(p.name for p in (run / "sft" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-4", "checkpoint-8"]
    # resumed at 4 (checkpoint-8's trainer_state.json does not parse: removed), killed after checkpoint-8 and
    # then checkpoint-12, the final one
    kill("checkpoint=2", *command)
    kill("write=metrics.json", *command)  # resumed at 12 (no step left), at the write of metrics.json
    assert stale(run) and all(".metrics.json." in p for p in stale(run))
    assert manifest.read(run / "sft")["status"] == "running"
    with one_thread():
        sft.main(recipe(run))
    m = manifest.read(run / "sft")
    assert m["status"] == "complete" and m["attempts"] == 4 and m["resumed_from"] == "checkpoints/checkpoint-12"
    assert_same_figures(run / "sft", uninterrupted / "sft")
    assert stale(run) == []


@pytest.mark.slow
def test_reward_killed_mid_run_reports_true_figures(uninterrupted, tmp_path):
    from rlhfchat.train import reward

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run, ignore=shutil.ignore_patterns("reward"))
    kill("checkpoint=1", *stage_command("reward", run))  # after checkpoint-8 of 16
    with one_thread():
        reward.main(recipe(run))
    assert manifest.read(run / "reward")["resumed_from"] == "checkpoints/checkpoint-8"
    assert_same_figures(run / "reward", uninterrupted / "reward")


@pytest.mark.slow
def test_a_rerun_removes_the_temporary_of_every_write_a_killed_pipeline_left(tmp_path, monkeypatch):
    """One pipeline run leaves the complete temporary of every atomic write it makes, as a kill at that write would
    (`keep`), and is SIGKILLed at the rename of its first PPO checkpoint; the rerun finishes and leaves none."""
    from rlhfchat import pipeline
    from rlhfchat.config import load_recipe

    run = tmp_path / "run"
    kill("keep,write=step-*", "pipeline", "recipes/tiny-cpu.yaml", f"output_dir={run}", *SMALL, cwd=ROOT)
    left = stale(run)
    kinds = {p.split("/")[0] + "/" + p.split("/")[-1].split(".")[1] if "/" in p else p.split(".")[1] for p in left}
    assert {"recipe", "data", "data/card", "data/manifest", "sft/metrics", "sft/manifest", "reward/metrics",
            "ppo/manifest", "ppo/step-000001"} <= kinds, kinds
    assert manifest.read(run / "ppo")["status"] == "running"

    monkeypatch.chdir(ROOT)
    with one_thread():
        pipeline.main(load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"output_dir={run}", *SMALL]))
    for stage in ("data", "base", "sft", "reward", "ppo", "eval"):
        assert manifest.read(run / stage)["status"] == "complete", stage
    assert stale(run) == []
    assert sorted(p.name for p in (run / "ppo" / "checkpoints").iterdir()) == ["step-000002"]


# ---- every stage checks its inputs' manifests ---------------------------------------------------------------------

def _unfinished(run: Path, stage: str, tiny_model_dir: Path) -> None:
    """`run/stage` as a stage killed while saving leaves it: a config, half a model, a manifest saying running."""
    (run / stage).mkdir(parents=True, exist_ok=True)
    if not (run / stage / "config.json").is_file():
        shutil.copyfile(tiny_model_dir / "config.json", run / stage / "config.json")
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (run / stage / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (run / stage / manifest.MANIFEST).write_text(json.dumps({"stage": stage, "status": "running"}))


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, err.getvalue().strip()


@pytest.fixture
def complete_run(tmp_path, tiny_model_dir, tiny_reward_dir) -> Path:
    """data/, sft/ and reward/ with manifests that say complete (the models are the shared tiny ones)."""
    run = tmp_path / "run"
    _write_data(run / "data")
    for split in ("train", "eval"):
        (run / "data" / f"prompts.{split}.jsonl").write_text(json.dumps(
            {"id": "p", "source": "t", "prompt": [{"role": "user", "content": "What is 1 + 1?"}]}) + "\n")
    for stage, src in (("data", None), ("sft", tiny_model_dir), ("reward", tiny_reward_dir)):
        if src:
            shutil.copytree(src, run / stage)
        (run / stage / manifest.MANIFEST).write_text(json.dumps({"stage": stage, "status": "complete"}))
    return run


@pytest.mark.parametrize("unfinished, command", [
    ("data", "sft"), ("data", "reward"), ("sft", "reward"),
    ("sft", "ppo"), ("reward", "ppo"), ("data", "ppo"),
    ("sft", "eval"), ("reward", "eval"), ("ppo", "eval"),
])
def test_a_stage_refuses_an_input_folder_whose_stage_has_not_finished(complete_run, tiny_model_dir, unfinished,
                                                                       command):
    _unfinished(complete_run, unfinished, tiny_model_dir)
    before = sorted(str(p) for p in complete_run.rglob("*"))
    rc, err = _cli(*stage_command(command, complete_run))
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"error: {complete_run / unfinished}: incomplete: its manifest.json says the {unfinished} "
                          f"stage is 'running'"), err
    assert f"rerun `rlhfchat {unfinished} RECIPE.yaml`" in err
    assert sorted(str(p) for p in complete_run.rglob("*")) == before  # refused before writing anything


def test_serve_and_delta_make_refuse_an_unfinished_stage_folder(complete_run, tiny_model_dir, tmp_path):
    _unfinished(complete_run, "ppo", tiny_model_dir)
    rc, err = _cli("serve", str(complete_run / "ppo"), str(complete_run / "sft"))
    assert rc == 2 and err.startswith(f"error: {complete_run / 'ppo'}: incomplete"), err
    rc, err = _cli("delta", "make", "--base", str(complete_run / "sft"), "--target", str(complete_run / "ppo"),
                   "--out", str(tmp_path / "delta"))
    assert rc == 2 and err.startswith(f"error: {complete_run / 'ppo'}: incomplete"), err
    assert not (tmp_path / "delta").exists()


def test_stale_temporaries_of_a_live_writer_are_kept(tmp_path):
    """The sweep removes only what a writer that is gone left: a concurrent writer's temporary stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = [f".metrics.json.abcd1234.{live.pid}.tmp", ".metrics.json.abcd1234.tmp",  # no pid: older rlhfchat
                 f".metrics.json.efgh5678.{os.getpid()}.tmp", ".notes.tmp", "model.safetensors"]
        for name in names:
            (tmp_path / name).write_text("x")
        (tmp_path / f".data.{dead.pid}.old").mkdir()  # atomic_dir's previous folder, killed between its renames
        (tmp_path / f".reward.{dead.pid}.old").mkdir()  # ... where the new one is in place: removed
        (tmp_path / "reward").mkdir()
        removed = atomic.sweep(tmp_path)
        assert sorted(p.name for p in removed) == [f".data.{dead.pid}.old", ".metrics.json.abcd1234.tmp",
                                                   f".reward.{dead.pid}.old"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["data", "reward", *(n for n in names if n != ".metrics.json.abcd1234.tmp")])  # data/ is put back
    finally:
        live.kill()
        live.wait()
