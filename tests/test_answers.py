"""Final answers (rlhfchat.data.answers) and the GSM8K adapter on files in openai/gsm8k's published schema."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfchat.config import SourceConfig
from rlhfchat.data import gsm8k
from rlhfchat.data.answers import answers_match, final_answer
from rlhfchat.data.readers import read_rows
from rlhfchat.data.schema import validate


@pytest.mark.parametrize("text, want", [
    ("48 + 24 = 72. The answer is 72.", "72"),
    ("12 + 7 = 19.", "19"),  # the full stop is punctuation
    ("She has 1,250 apples left.\n#### 1,250", "1250"),
    ("#### 72", "72"),
    ("The answer is: $1,000.", "1000"),
    ("THE ANSWER IS -4", "-4"),
    ("So x = -3.50.", "-3.5"),
    ("x=-3", "-3"),
    ("It costs \u22124 dollars", "-4"),  # the Unicode minus
    ("12-7 = 5", "5"),  # a minus glued to a digit is an operator, not a sign
    ("we got +7", "7"),
    ("answer is 0.0", "0"),
    ("I think 5, no 6", "6"),
    ("The answer is 18. Check: 12 + 7 = 19", "18"),  # "the answer is" wins over a later number
    ("#### 3\nThe answer is 4", "3"),  # the GSM8K marker wins over both
    ("no number here", None),
    ("", None),
])
def test_final_answer(text, want):
    assert final_answer(text) == want


def test_answers_match_compares_values_not_spellings():
    assert answers_match("The answer is 72.0", "72")
    assert answers_match("1000 in all", "1,000")
    assert answers_match("#### 1,250", "1250")
    assert not answers_match("The answer is 7.", "8")
    assert not answers_match("I don't know.", "1")
    assert not answers_match("The answer is 3.", "no number")  # a reference without a number matches nothing


# --------------------------------------------------------------------------------------------------------------
# gsm8k: {question, answer} rows as openai/gsm8k publishes them (main/ and socratic/ parquet files)

MAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1,200 pens on Monday and 300 fewer on Tuesday. How many pens in all?",
     "answer": "On Tuesday it sold 1,200-300 = <<1200-300=900>>900 pens.\nIn all 1,200+900 = <<1200+900=2100>>2,100 "
               "pens.\n#### 2,100"},
    {"question": "A malformed row without a final line.", "answer": "It is 5."},
    {"question": "   ", "answer": "#### 1"},
]
SOCRATIC = [
    {"question": MAIN[0]["question"],
     "answer": "How many clips did Natalia sell in May? ** Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "How many clips did Natalia sell altogether? ** Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
]


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def clone(tmp_path) -> Path:
    """A local copy of the hub repository's layout: main/ and socratic/, train and test parquet files."""
    root = tmp_path / "gsm8k"
    _parquet(root / "main" / "train-00000-of-00001.parquet", MAIN)
    _parquet(root / "main" / "test-00000-of-00001.parquet", MAIN[:1])
    _parquet(root / "socratic" / "train-00000-of-00001.parquet", SOCRATIC)
    _parquet(root / "socratic" / "test-00000-of-00001.parquet", SOCRATIC)
    return root


def _run(kind: str, path: Path, subset: str | None = None, split: str = "train"):
    stats: Counter = Counter()
    cfg = SourceConfig(source="gsm8k", path=str(path), subset=subset, split=split)
    rows = read_rows(str(path), split=split, subset=subset, columns=gsm8k.COLUMNS)
    return list(getattr(gsm8k, kind)(rows, cfg, stats)), stats


def test_gsm8k_sft_is_the_worked_solution_without_annotations(clone):
    records, stats = _run("sft", clone, subset="main")
    assert stats == Counter({"no final answer": 1, "empty question": 1})
    assert len(records) == 2
    first = records[0]
    validate("sft", first, "record")
    assert first["source"] == "gsm8k" and first["id"].startswith("gsm8k-")
    assert first["messages"] == [
        {"role": "user", "content": MAIN[0]["question"]},
        {"role": "assistant", "content": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                         "altogether in April and May.\nThe answer is 72."},
    ]
    assert final_answer(records[1]["messages"][1]["content"]) == "2100"


def test_gsm8k_prompts_carry_their_reference(clone):
    records, _ = _run("prompts", clone, subset="main")
    for rec in records:
        validate("prompts", rec, "record")
    assert [r["reference"] for r in records] == ["72", "2100"]
    assert records[0]["prompt"] == [{"role": "user", "content": MAIN[0]["question"]}]
    test, _ = _run("prompts", clone, subset="main", split="test")
    assert len(test) == 1


def test_gsm8k_subset_picks_the_socratic_folder_of_a_local_clone(clone):
    records, _ = _run("sft", clone, subset="socratic")
    assert len(records) == 1
    assert records[0]["messages"][1]["content"].startswith("How many clips did Natalia sell in May? ** Natalia")
    assert records[0]["messages"][1]["content"].endswith("The answer is 72.")


def test_gsm8k_jsonl_as_published_and_a_missing_field(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(MAIN[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(Exception, match=r"train.jsonl line 2: missing field 'answer'"):
        _run("prompts", path)


def test_a_prompt_reference_must_be_a_string():
    rec = {"id": "a", "source": "s", "prompt": [{"role": "user", "content": "q"}], "reference": 7}
    with pytest.raises(Exception, match=r"f.jsonl line 3: field 'reference' must be a string, got int"):
        validate("prompts", rec, "f.jsonl line 3")


def test_the_data_stage_writes_gsm8k_prompts_with_references(clone, tmp_path):
    from rlhfchat.config import load_recipe
    from rlhfchat.data import mixture
    from rlhfchat.data.schema import read_jsonl

    recipe = load_recipe(None, ["name=g", f"output_dir={tmp_path / 'run'}", "data.eval_fraction=0",
                                f"data.sft=[{{source: gsm8k, path: {clone}, subset: main}}]",
                                f"data.prompts=[{{source: gsm8k, path: {clone}, subset: main}}]"])
    card = mixture.build(recipe)
    assert card["prompts"]["train"] == 2 and card["sft"]["train"] == 2
    prompts = list(read_jsonl(tmp_path / "run" / "data" / "prompts.train.jsonl", "prompts"))
    assert sorted(p["reference"] for p in prompts) == ["2100", "72"]



def test_the_data_stage_gives_sft_and_prompts_two_halves_of_one_split(tmp_path):
    """`split: "train[:50%]"` for SFT and `"train[50%:]"` for prompts: each row in exactly one, in order."""
    from rlhfchat.config import load_recipe
    from rlhfchat.data import mixture
    from rlhfchat.data.schema import read_jsonl
    from rlhfchat.errors import RlhfchatError

    rows = [{"question": f"Tom has {i} apples and buys 2 more. How many now?",
             "answer": f"Tom has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(7)]
    root = tmp_path / "gsm8k"
    _parquet(root / "main" / "train-00000-of-00001.parquet", rows)
    half = lambda kind, s: f'data.{kind}=[{{source: gsm8k, path: {root}, subset: main, split: "{s}"}}]'
    recipe = load_recipe(None, ["name=g", f"output_dir={tmp_path / 'run'}", "data.eval_fraction=0",
                                half("sft", "train[:50%]"), half("prompts", "train[50%:]")])
    mixture.build(recipe)
    data = tmp_path / "run" / "data"
    sft = [c["messages"][0]["content"] for c in read_jsonl(data / "sft.train.jsonl", "sft")]
    prompts = {p["prompt"][0]["content"]: p["reference"] for p in read_jsonl(data / "prompts.train.jsonl", "prompts")}
    # 50% of 7 rows rounds to 4 (as datasets rounds): rows 0-3 are SFT's, 4-6 the prompts'
    assert sorted(sft) == sorted(r["question"] for r in rows[:4])
    assert prompts == {r["question"]: str(i + 2) for i, r in enumerate(rows) if i >= 4}
    bad = load_recipe(None, ["name=g", f"output_dir={tmp_path / 'bad'}", half("sft", "train[:half]")])
    with pytest.raises(RlhfchatError, match=r"data\.sft\[0\] \(gsm8k\): split 'train\[:half\]': expected a split "
                                            r"name or a slice"):
        mixture.build(bad)
