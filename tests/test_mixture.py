"""The data stage end to end: mixture, weights, dedupe, split, card, determinism, errors and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhfchat import cli
from rlhfchat.config import load_recipe
from rlhfchat.data import mixture
from rlhfchat.data.schema import read_jsonl, record_key
from rlhfchat.errors import RlhfchatError

FILES = ["sft.train.jsonl", "sft.eval.jsonl", "preferences.train.jsonl", "preferences.eval.jsonl",
         "prompts.train.jsonl", "prompts.eval.jsonl", "card.json"]


def write_lines(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Small files of three sources; gpt4all rows 0-4 are also alpaca rows (same conversation)."""
    d = tmp_path / "src"
    d.mkdir()
    gpt4all = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "source": "unified_chip2"} for i in range(20)]
    alpaca = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}.", "text": "..."}
              for i in range(5)]
    alpaca += [{"instruction": f"Task {i}", "input": "", "output": f"Done {i}.", "text": "..."} for i in range(5)]
    hh = [{"chosen": f"\n\nHuman: Q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: Q{i}\n\nAssistant: bad {i}"}
          for i in range(10)]
    return {"gpt4all": write_lines(d / "gpt4all.jsonl", gpt4all), "alpaca": write_lines(d / "alpaca.jsonl", alpaca),
            "hh_rlhf": write_lines(d / "hh.jsonl", hh), "dir": str(d)}


def recipe_file(tmp_path: Path, data: dict, name: str = "recipe.yaml", out: str = "run") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / out), "seed": 3, "data": data}))
    return path


def mix(sources, **data):
    base = {"eval_fraction": 0.1,
            "sft": [{"source": "gpt4all", "path": sources["gpt4all"]}, {"source": "alpaca", "path": sources["alpaca"]}],
            "preferences": [{"source": "hh_rlhf", "path": sources["hh_rlhf"]}],
            "prompts": [{"source": "gpt4all", "path": sources["gpt4all"]}]}
    base.update(data)
    return base


def records(run_dir: Path, kind: str, split: str) -> list[dict]:
    return list(read_jsonl(run_dir / "data" / f"{kind}.{split}.jsonl", kind))


def test_mixture_writes_the_run_folder_dedupes_and_counts(sources, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, mix(sources)))
    card = mixture.build(recipe)
    run = Path(recipe.output_dir)
    assert sorted(p.name for p in (run / "data").iterdir()) == sorted(FILES)
    assert load_recipe(run / "recipe.yaml").data == recipe.data
    sft = records(run, "sft", "train") + records(run, "sft", "eval")
    assert len(sft) == 25 and len({record_key("sft", r) for r in sft}) == 25  # 20 + 10 - 5 duplicates
    assert card["sft"]["sources"] == [
        {"index": 0, "source": "gpt4all", "path": sources["gpt4all"], "rows_read": 20, "records": 20,
         "dropped": {}, "kept": 20},
        {"index": 1, "source": "alpaca", "path": sources["alpaca"], "rows_read": 10, "records": 10,
         "dropped": {"duplicate": 5}, "kept": 5}]
    assert (card["sft"]["train"], card["sft"]["eval"]) == (23, 2)  # round(25 * 0.1)
    assert card["preferences"]["eval"] == 1 and card["prompts"]["train"] + card["prompts"]["eval"] == 20
    assert card["seed"] == 3 and len(card["sft"]["files"]["sft.train.jsonl"]["sha256"]) == 64
    assert json.loads((run / "data" / "card.json").read_text()) == card
    assert {r["source"] for r in records(run, "preferences", "train")} == {"hh_rlhf"}


def test_same_recipe_gives_byte_identical_files(sources, tmp_path):
    data = mix(sources, sft=[{"source": "gpt4all", "path": sources["gpt4all"], "weight": 1.5},
                             {"source": "alpaca", "path": sources["alpaca"], "weight": 0.5}])
    a = load_recipe(recipe_file(tmp_path, data, "a.yaml", "a"))
    b = load_recipe(recipe_file(tmp_path, data, "b.yaml", "b"))
    mixture.build(a)
    mixture.build(b)
    for name in FILES:
        assert (Path(a.output_dir) / "data" / name).read_bytes() == (Path(b.output_dir) / "data" / name).read_bytes()
    c = load_recipe(recipe_file(tmp_path, data, "c.yaml", "c"), ["seed=4"])
    mixture.build(c)
    assert (Path(c.output_dir) / "data" / "sft.train.jsonl").read_bytes() != \
        (Path(a.output_dir) / "data" / "sft.train.jsonl").read_bytes()


def test_weights_max_examples_and_eval_split(sources, tmp_path):
    data = mix(sources, eval_fraction=0.2,
               sft=[{"source": "gpt4all", "path": sources["gpt4all"], "weight": 3.0},
                    {"source": "alpaca", "path": sources["alpaca"], "weight": 0.4}],
               preferences=[{"source": "hh_rlhf", "path": sources["hh_rlhf"], "max_examples": 4}])
    recipe = load_recipe(recipe_file(tmp_path, data))
    card = mixture.build(recipe)
    g, a = card["sft"]["sources"]
    assert g["kept"] == 60 and a["kept"] == 2 and a["dropped"] == {"duplicate": 5, "left out by weight": 3}
    assert card["preferences"]["sources"][0]["dropped"] == {"over max_examples": 6}
    assert card["preferences"]["train"] + card["preferences"]["eval"] == 4
    run = Path(recipe.output_dir)
    train, held = records(run, "sft", "train"), records(run, "sft", "eval")
    assert len(train) + len(held) == 62 and 9 <= len(held) <= 12
    # copies drawn by weight > 1 stay on one side of the split
    assert not {record_key("sft", r) for r in train} & {record_key("sft", r) for r in held}
    # the other kinds' draws do not move when a source is added to sft
    data["sft"].append({"source": "gpt4all", "path": sources["gpt4all"]})
    again = load_recipe(recipe_file(tmp_path, data, "again.yaml", "again"))
    mixture.build(again)
    for name in ("preferences.train.jsonl", "prompts.eval.jsonl"):
        assert (run / "data" / name).read_bytes() == (Path(again.output_dir) / "data" / name).read_bytes()


def test_eval_fraction_edges(sources, tmp_path):
    one = write_lines(tmp_path / "one.jsonl", [{"prompt": "a", "response": "b"}])
    data = mix(sources, eval_fraction=0.01, preferences=[], prompts=[{"source": "gpt4all", "path": one}])
    card = mixture.build(load_recipe(recipe_file(tmp_path, data)))
    assert card["sft"]["eval"] == 1  # at least one
    assert (card["prompts"]["train"], card["prompts"]["eval"]) == (1, 0)  # one record stays in train
    assert card["preferences"] == {"sources": [], "train": 0, "eval": 0, "files": card["preferences"]["files"]}
    card = mixture.build(load_recipe(recipe_file(tmp_path, data), ["data.eval_fraction=0", "data.dedupe=false"]))
    assert card["sft"]["eval"] == 0 and card["sft"]["train"] == 30


def test_a_held_out_source_is_the_kinds_whole_eval_file(sources, tmp_path):
    """A published test split marked held_out goes to eval whole; the kind's other sources then stay in train."""
    test_split = write_lines(tmp_path / "test.jsonl", [{"prompt": f"Exam {i}?", "response": "x"} for i in range(4)]
                             + [{"prompt": "Question 3?", "response": "Answer 3."}])  # also a train record
    data = mix(sources, eval_fraction=0.2,
               prompts=[{"source": "gpt4all", "path": sources["gpt4all"]},
                        {"source": "gpt4all", "path": test_split, "held_out": True}])
    recipe = load_recipe(recipe_file(tmp_path, data))
    card = mixture.build(recipe)
    run = Path(recipe.output_dir)
    held = records(run, "prompts", "eval")
    assert sorted(r["prompt"][0]["content"] for r in held) == [f"Exam {i}?" for i in range(4)]
    assert len(records(run, "prompts", "train")) == 20  # eval_fraction holds out nothing more
    assert card["prompts"]["sources"][1]["held_out"] is True and "held_out" not in card["prompts"]["sources"][0]
    assert card["prompts"]["sources"][1]["dropped"] == {"duplicate": 1}  # never on both sides
    assert card["sft"]["eval"] == 5  # kinds without a held-out source split as before: round(25 x 0.2)


# --------------------------------------------------------------------------------------------------------------
# errors: one line naming the file, line or row and field; nothing half-written


def cli_error(capsys, recipe: Path, *overrides: str) -> str:
    assert cli.main(["data", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_errors_name_the_source_file_line_and_field(sources, tmp_path, capsys):
    d = Path(sources["dir"])
    bad_json = d / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    missing = write_lines(d / "missing.jsonl", [{"prompt": "a"}])
    wrong = write_lines(d / "wrong.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": ["a"], "response": "b"}])
    cases = [
        (str(d / "nope.jsonl"), r"data.sft\[0\] \(gpt4all\): .*nope.jsonl: file not found"),
        (str(bad_json), r"data.sft\[0\] \(gpt4all\): .*bad.jsonl line 2: invalid JSON"),
        (missing, r"missing.jsonl line 1: missing field 'response'"),
        (wrong, r"wrong.jsonl line 2: field 'prompt' must be str, got list"),
    ]
    for path, pattern in cases:
        recipe = recipe_file(tmp_path, mix(sources, sft=[{"source": "gpt4all", "path": path}]))
        err = cli_error(capsys, recipe)
        assert __import__("re").search(pattern, err), err
    recipe = recipe_file(tmp_path, mix(sources, sft=[{"source": "reddit", "path": sources["gpt4all"]}]))
    assert "data.sft[0].source: unknown source 'reddit'; valid: oasst1, gpt4all, alpaca" in cli_error(capsys, recipe)
    recipe = recipe_file(tmp_path, mix(sources, prompts=[{"source": "gpt4all", "path": "nobody/no-such-dataset"}]))
    assert "'nobody/no-such-dataset' is neither a local file nor reachable on the hub" in cli_error(capsys, recipe)


def test_a_failed_run_leaves_nothing_half_written(sources, tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", [{"chosen": "x", "rejected": 3}])
    recipe = load_recipe(recipe_file(tmp_path, mix(sources, preferences=[{"source": "hh_rlhf", "path": bad}])))
    with pytest.raises(RlhfchatError, match=r"bad.jsonl line 1: field 'rejected'"):
        mixture.build(recipe)
    assert not Path(recipe.output_dir).exists()
    good = load_recipe(recipe_file(tmp_path, mix(sources)))
    mixture.build(good)
    before = {p.name: p.read_bytes() for p in (Path(good.output_dir) / "data").iterdir()}
    with pytest.raises(RlhfchatError):
        mixture.build(recipe)
    run = Path(good.output_dir)
    assert sorted(p.name for p in run.iterdir()) == ["data", "recipe.yaml"]
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before


def test_cli_runs_the_stage_and_has_help(sources, tmp_path, capsys):
    recipe = recipe_file(tmp_path, mix(sources))
    assert cli.main(["data", str(recipe), "data.eval_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"records in {tmp_path / 'run' / 'data'}" in out and "sft" in out
    card = json.loads((tmp_path / "run" / "data" / "card.json").read_text())
    assert card["eval_fraction"] == 0.5 and card["sft"]["eval"] == 12
    help_run = subprocess.run([sys.executable, "-m", "rlhfchat.cli", "data", "--help"], capture_output=True,
                              text=True, timeout=60)
    assert help_run.returncode == 0 and "RECIPE.yaml" in help_run.stdout


def test_dedupe_key_matches_record_key():
    from rlhfchat.data.schema import conversation, message, preference

    recs = [conversation("a", "x", [message("user", "Grüß dich \"ü\"\n"), message("assistant", "日本語")]),
            conversation("b", "y", [message("user", "Grüß dich \"ü\"\n"), message("assistant", "日本語")]),
            conversation("c", "x", [message("user", "Grüß dich"), message("assistant", "日本語")]),
            preference("d", "x", [message("user", "q")], "a", "b"),
            preference("e", "z", [message("user", "q")], "a", "b"),
            preference("f", "x", [message("user", "q")], "b", "a")]
    kinds = ["sft"] * 3 + ["preferences"] * 3
    fast = [mixture._encode(k, r)[0] for k, r in zip(kinds, recs)]
    slow = [record_key(k, r) for k, r in zip(kinds, recs)]
    assert [[a == b for b in fast] for a in fast] == [[a == b for b in slow] for a in slow]
    assert mixture._encode("sft", recs[0])[1].decode() == json.dumps(recs[0], ensure_ascii=False)


def test_bundled_samples_smoke(tmp_path, monkeypatch):
    """The repository's sample data (data/sample, made by rlhfchat/data/sample_formats.py) through the stage."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "data" / "sample" / "oasst1").is_dir():
        pytest.skip("no bundled sample data")
    monkeypatch.chdir(root)
    s = str(root / "data" / "sample")
    data = {"sft": [{"source": "oasst1", "path": f"{s}/oasst1"}, {"source": "gpt4all", "path": f"{s}/gpt4all"},
                    {"source": "alpaca", "path": f"{s}/alpaca"}],
            "preferences": [{"source": "oasst1", "path": f"{s}/oasst1", "langs": ["en"]},
                            {"source": "hh_rlhf", "path": f"{s}/hh_rlhf"}, {"source": "shp", "path": f"{s}/shp"}],
            "prompts": [{"source": "oasst1", "path": f"{s}/oasst1", "langs": ["en"]}]}
    card = mixture.build(load_recipe(recipe_file(tmp_path, data)))
    for kind in ("sft", "preferences", "prompts"):
        assert card[kind]["train"] > 0 and card[kind]["eval"] > 0
        assert all(src["kept"] > 0 for src in card[kind]["sources"])


def test_bench_data_runs_at_a_tiny_scale(tmp_path, capsys):
    assert cli.main(["bench", "data", "--scale", "0.002", "--workdir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"rows_per_s", "seconds", "peak_rss_mb", "rows", "scale"}
    assert result["rows"] == sum(max(2, round(n * 0.002)) for n in (161_443, 437_604, 52_002, 160_800, 348_718))
    assert all(result["records"][k] > 0 for k in ("sft", "preferences", "prompts"))
