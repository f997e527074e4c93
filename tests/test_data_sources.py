"""Each source adapter on small files hand-written in its published schema, edge cases included."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfchat.config import SourceConfig
from rlhfchat.data import alpaca, feedback, gpt4all, hh_rlhf, oasst1, shp
from rlhfchat.data.readers import read_rows
from rlhfchat.errors import RlhfchatError


def run(module, kind: str, path: Path, **options):
    """All records `module` gives for `kind` from `path`, and its drop counts."""
    stats: Counter = Counter()
    cfg = SourceConfig(source=module.NAME, path=str(path), **options)
    rows = read_rows(str(path), columns=module.COLUMNS)
    return list(getattr(module, kind)(rows, cfg, stats)), stats


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------------------------------
# oasst1: flat message rows, as in OpenAssistant/oasst1's parquet files

OASST1_SCHEMA = pa.schema([
    ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
    ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
    ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", pa.int32()),
    ("synthetic", pa.bool_()), ("model_name", pa.string()),
    ("detoxify", pa.struct([("toxicity", pa.float64()), ("severe_toxicity", pa.float64())])),
    ("message_tree_id", pa.string()), ("tree_state", pa.string()),
    ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
    ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int32()))])),
])


def uid(name: str) -> str:
    return f"6ab24d72-0181-4594-a9cd-{name:0>12}"


def msg(name, parent, role, text, *, tree, minute, rank=None, lang="en", deleted=False, review=True):
    return {
        "message_id": uid(name), "parent_id": uid(parent) if parent else None, "user_id": uid("u" + name),
        "created_date": f"2023-02-05T14:{minute:02d}:50.983374+00:00", "text": text, "role": role, "lang": lang,
        "review_count": 3, "review_result": review, "deleted": deleted, "rank": rank, "synthetic": False,
        "model_name": None, "detoxify": {"toxicity": 0.001, "severe_toxicity": 0.0001},
        "message_tree_id": uid(tree), "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]}, "labels": {"name": ["spam"], "value": [0.0], "count": [3]},
    }


OASST1_ROWS = [
    # tree a: three ranked replies, one failed review (with a reply under it); follow-ups under two of them
    msg("a0", None, "prompter", "What is the capital of France?", tree="a0", minute=0),
    msg("a1", "a0", "assistant", "Paris, I think.", tree="a0", minute=1, rank=1),
    msg("a2", "a0", "assistant", "The capital of France is Paris.", tree="a0", minute=2, rank=0),
    msg("a3", "a0", "assistant", "London.", tree="a0", minute=3, rank=2),
    msg("a9", "a0", "assistant", "Buy cheap watches!", tree="a0", minute=4, rank=3, review=False),
    msg("a10", "a9", "prompter", "What?", tree="a0", minute=5),
    msg("a4", "a2", "prompter", "And of Germany?", tree="a0", minute=6),
    msg("a5", "a4", "assistant", "Berlin, since 1990.", tree="a0", minute=8),  # unranked, later
    msg("a6", "a4", "assistant", "Germany's capital is Berlin.", tree="a0", minute=7),  # unranked, earliest
    msg("a7", "a2", "prompter", "a deleted follow-up", tree="a0", minute=9, deleted=True),
    msg("a8", "a7", "assistant", "a reply under a deleted message", tree="a0", minute=10),
    msg("a11", "a1", "prompter", "Are you sure?", tree="a0", minute=11),
    msg("a12", "a11", "assistant", "Yes, Paris.", tree="a0", minute=12, rank=0),
    msg("a13", "a11", "assistant", "No.", tree="a0", minute=13, rank=1),
    # tree b: German; one reply not reviewed yet (review_result null is kept)
    msg("b0", None, "prompter", "Wie spät ist es?", tree="b0", minute=20, lang="de"),
    msg("b2", "b0", "assistant", "Zeit für Kaffee.", tree="b0", minute=22, rank=1, review=None),
    msg("b1", "b0", "assistant", "Das weiß ich nicht.", tree="b0", minute=21, rank=0, lang="de"),
    # tree c: deleted root, the whole tree goes
    msg("c0", None, "prompter", "deleted root", tree="c0", minute=30, deleted=True),
    msg("c1", "c0", "assistant", "reply to a deleted root", tree="c0", minute=31, rank=0),
    # tree d: a prompt nobody answered
    msg("d0", None, "prompter", "Tell me a joke.", tree="d0", minute=40),
    # a message whose parent is not in the file
    msg("e1", "zz", "assistant", "orphan", tree="zz", minute=50, rank=0),
]


@pytest.fixture
def oasst1_file(tmp_path) -> Path:
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(OASST1_ROWS, schema=OASST1_SCHEMA), path)
    return path


def test_oasst1_sft_follows_the_best_reply_and_drops_subtrees(oasst1_file):
    records, stats = run(oasst1, "sft", oasst1_file)
    assert records == [
        {"id": f"oasst1-{uid('a0')}", "source": "oasst1", "messages": [
            user("What is the capital of France?"), assistant("The capital of France is Paris."),
            user("And of Germany?"), assistant("Germany's capital is Berlin.")]},
        {"id": f"oasst1-{uid('b0')}", "source": "oasst1", "messages": [
            user("Wie spät ist es?"), assistant("Das weiß ich nicht.")]},
    ]
    assert stats == {"deleted": 2, "failed review": 1, "in a dropped subtree": 3, "parent missing": 1,
                     "tree without a reply": 1}


def test_oasst1_preferences_pairs_and_prompt_up_to_the_prompter_message(oasst1_file):
    records, _ = run(oasst1, "preferences", oasst1_file)
    pairs = [(r["chosen"], r["rejected"]) for r in records]
    assert pairs == [
        ("The capital of France is Paris.", "Paris, I think."),
        ("The capital of France is Paris.", "London."),
        ("Yes, Paris.", "No."),
        ("Das weiß ich nicht.", "Zeit für Kaffee."),
    ]
    assert records[2]["prompt"] == [user("What is the capital of France?"), assistant("Paris, I think."),
                                    user("Are you sure?")]
    assert records[0]["id"] == f"oasst1-{uid('a2')}-{uid('a1')}"
    assert all(r["prompt"][-1]["role"] == "user" for r in records)

    worst, _ = run(oasst1, "preferences", oasst1_file, pairs="best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in worst] == [
        ("The capital of France is Paris.", "London."), ("Yes, Paris.", "No."),
        ("Das weiß ich nicht.", "Zeit für Kaffee.")]
    every, _ = run(oasst1, "preferences", oasst1_file, pairs="all")
    assert len(every) == 5 and ("Paris, I think.", "London.") in [(r["chosen"], r["rejected"]) for r in every]


def test_oasst1_prompts_langs_and_strict(oasst1_file):
    records, _ = run(oasst1, "prompts", oasst1_file)
    assert [r["prompt"] for r in records] == [[user("What is the capital of France?")], [user("Wie spät ist es?")],
                                              [user("Tell me a joke.")]]
    english, stats = run(oasst1, "prompts", oasst1_file, langs=["en"])
    assert len(english) == 2 and stats["lang not in langs"] == 1 and stats["in a dropped subtree"] == 2 + 3
    with pytest.raises(RlhfchatError, match=r"row 21: field 'parent_id': parent '.*zz' not found"):
        run(oasst1, "sft", oasst1_file, strict=True)


def test_oasst1_reads_the_jsonl_release_and_names_bad_rows(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("detoxify", "emojis", "labels")} for r in OASST1_ROWS]
    records, _ = run(oasst1, "sft", write_jsonl(tmp_path / "oasst1.messages.jsonl.gz", rows))
    assert len(records) == 2
    bad = [dict(rows[0]), dict(rows[1], role="bot")]
    with pytest.raises(RlhfchatError, match=r"oasst1.jsonl line 2: field 'role' must be 'prompter' or 'assistant'"):
        run(oasst1, "sft", write_jsonl(tmp_path / "oasst1.jsonl", bad))
    bad = [dict(rows[0], rank="first")]
    with pytest.raises(RlhfchatError, match=r"line 1: field 'rank' must be int or float, got str"):
        run(oasst1, "sft", write_jsonl(tmp_path / "oasst1.jsonl", bad))


# --------------------------------------------------------------------------------------------------------------
# gpt4all and alpaca: one turn each, from parquet as on the hub


def test_gpt4all_skips_empty_responses_and_builds_prompts(tmp_path):
    path = tmp_path / "gpt4all.parquet"
    pq.write_table(pa.table({
        "prompt": ["Write a haiku about rain.", "Say nothing.", "What is 2+2?"],
        "response": ["Rain taps the window", "   ", "4"],
        "source": ["unified_chip2", "laion/unified_chip2", "pacovaldez/stackoverflow-questions"],
    }), path)
    records, stats = run(gpt4all, "sft", path)
    assert [r["messages"] for r in records] == [
        [user("Write a haiku about rain."), assistant("Rain taps the window")],
        [user("What is 2+2?"), assistant("4")]]
    assert stats == {"empty response": 1}
    assert records[0]["id"].startswith("gpt4all-") and len(records[0]["id"]) == len("gpt4all-") + 16
    assert run(gpt4all, "sft", path)[0][0]["id"] == records[0]["id"]  # stable
    prompts, _ = run(gpt4all, "prompts", path)
    assert [r["prompt"] for r in prompts] == [[user("Write a haiku about rain.")], [user("What is 2+2?")]]


def test_alpaca_joins_instruction_and_input(tmp_path):
    path = tmp_path / "train-00000-of-00001-a09b74b3ef9c3b56.parquet"
    rows = [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat well.", "text": "Below is an instruction..."},
        {"instruction": "Translate to French.", "input": "Good morning",
         "output": "Bonjour", "text": "Below is an instruction..."},
        {"instruction": "Say nothing.", "input": "", "output": "", "text": "Below is an instruction..."},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, stats = run(alpaca, "sft", path)
    assert [r["messages"] for r in records] == [
        [user("Give three tips for staying healthy."), assistant("1. Eat well.")],
        [user("Translate to French.\n\nGood morning"), assistant("Bonjour")]]
    assert stats == {"empty output": 1}
    prompts, _ = run(alpaca, "prompts", path)
    assert prompts[1]["prompt"] == [user("Translate to French.\n\nGood morning")]


def test_missing_field_and_wrong_type_name_the_row_and_field(tmp_path):
    path = tmp_path / "gpt4all.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "source": ["x", "y"]}), path)
    with pytest.raises(RlhfchatError, match=r"gpt4all.parquet row 1: missing field 'response'"):
        run(gpt4all, "sft", path)
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "input": "", "output": "b"},
                                                   {"instruction": "a", "input": "", "output": 7}])
    with pytest.raises(RlhfchatError, match=r"alpaca.jsonl line 2: field 'output' must be str, got int 7"):
        run(alpaca, "sft", path)


# --------------------------------------------------------------------------------------------------------------
# hh-rlhf: transcripts in jsonl.gz, as in Anthropic/hh-rlhf/helpful-base/train.jsonl.gz

HH_PROMPT = ("\n\nHuman: My note says \"Human: be kind\". What does it mean?\n\nAssistant: It is a reminder."
             "\n\nHuman: A reminder of what?\nHuman: I mean, to whom?")
HH_ROWS = [
    {"chosen": HH_PROMPT + "\n\nAssistant: To you, from whoever wrote it.",
     "rejected": HH_PROMPT + "\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello!"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: ok?"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"},
]


def test_hh_rlhf_splits_at_markers_only_and_counts_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl.gz", HH_ROWS)
    records, stats = run(hh_rlhf, "preferences", path)
    assert records[0]["prompt"] == [
        user("My note says \"Human: be kind\". What does it mean?"), assistant("It is a reminder."),
        user("A reminder of what?\nHuman: I mean, to whom?")]
    assert (records[0]["chosen"], records[0]["rejected"]) == ("To you, from whoever wrote it.", "I don't know.")
    assert records[1] == {"id": records[1]["id"], "source": "hh_rlhf", "prompt": [user("What is 2+2?")],
                          "chosen": "4", "rejected": "5"}
    assert stats == {"chosen and rejected prompts differ": 1, "no final assistant reply": 2}
    prompts, _ = run(hh_rlhf, "prompts", path)
    assert [p["prompt"] for p in prompts] == [records[0]["prompt"], records[1]["prompt"]]
    with pytest.raises(RlhfchatError, match=r"train.jsonl.gz line 2: chosen and rejected prompts differ"):
        run(hh_rlhf, "preferences", path, strict=True)


# --------------------------------------------------------------------------------------------------------------
# SHP: JSON lines in .json files, as in stanfordnlp/SHP/askscience/train.json


def shp_row(post, a, b, label, ratio, history="Why is the sky blue?"):
    return {"post_id": post, "domain": "askscience_train", "upvote_ratio": 0.99, "history": history,
            "c_root_id_A": a, "c_root_id_B": b, "created_at_utc_A": 1400000000, "created_at_utc_B": 1400000100,
            "score_A": 30, "score_B": 10, "human_ref_A": f"answer {a}", "human_ref_B": f"answer {b}",
            "labels": label, "seconds_difference": 100.0, "score_ratio": ratio}


def test_shp_chooses_by_label_and_filters_by_score_ratio(tmp_path):
    path = write_jsonl(tmp_path / "train.json", [
        shp_row("p1", "c1", "c2", 1, 3.0), shp_row("p1", "c3", "c4", 0, 2.5), shp_row("p2", "c5", "c6", 1, 1.5)])
    records, stats = run(shp, "preferences", path)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in records] == [
        ("shp-p1-c1-c2", "answer c1", "answer c2"), ("shp-p1-c3-c4", "answer c4", "answer c3")]
    assert records[0]["prompt"] == [user("Why is the sky blue?")]
    assert stats == {"below min_score_ratio": 1}
    assert len(run(shp, "preferences", path, min_score_ratio=1.0)[0]) == 3
    prompts, _ = run(shp, "prompts", path)
    assert [p["prompt"] for p in prompts] == [[user("Why is the sky blue?")]] * 2
    bad = write_jsonl(tmp_path / "bad.json", [shp_row("p1", "c1", "c2", "1", 3.0)])
    with pytest.raises(RlhfchatError, match=r"bad.json line 1: field 'labels' must be int or bool, got str '1'"):
        run(shp, "preferences", bad)


# --------------------------------------------------------------------------------------------------------------
# feedback: canonical preference records exported by `rlhfchat feedback export`


def test_feedback_reads_exported_preferences(tmp_path):
    path = write_jsonl(tmp_path / "feedback.jsonl", [
        {"id": "fb-1", "source": "feedback", "prompt": [user("Hi")], "chosen": "Hello!", "rejected": "Go away."},
        {"id": "fb-2", "source": "feedback", "prompt": [user("Hi")], "chosen": "Same", "rejected": "Same"},
    ])
    records, stats = run(feedback, "preferences", path)
    assert records == [{"id": "fb-1", "source": "feedback", "prompt": [user("Hi")], "chosen": "Hello!",
                        "rejected": "Go away."}]
    assert stats == {"chosen equals rejected": 1}
    assert run(feedback, "prompts", path)[0][0] == {"id": "fb-1", "source": "feedback", "prompt": [user("Hi")]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "source": "feedback", "prompt": "Hi", "chosen": "a",
                                                "rejected": "b"}])
    with pytest.raises(RlhfchatError, match=r"bad.jsonl line 1: field 'prompt' must be a non-empty list"):
        run(feedback, "preferences", bad)


# --------------------------------------------------------------------------------------------------------------
# readers: formats, folders, splits, where


def test_reader_formats_folders_and_splits(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    folder = tmp_path / "repo"
    (folder / "data" / "x-more").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:1]), folder / "data" / "train-00000-of-00002.parquet")
    write_jsonl(folder / "data" / "x-more" / "train-00001-of-00002.jsonl.gz", rows[1:])
    write_jsonl(folder / "data" / "test.jsonl", [{"prompt": "t", "response": "t"}])
    (folder / "data" / "validation.json").write_text(json.dumps([{"prompt": "v", "response": "v"}]))
    (folder / "README.md").write_text("not data")
    got = list(read_rows(str(folder)))
    assert [r for _, r in got] == rows
    assert got[0][0].endswith("train-00000-of-00002.parquet row 1")
    assert got[1][0].endswith("train-00001-of-00002.jsonl.gz line 1")
    assert [r["prompt"] for _, r in read_rows(str(folder), split="validation")] == ["v"]
    with pytest.raises(RlhfchatError, match=r"no files of split 'dev'.*splits found: test, train, validation"):
        list(read_rows(str(folder), split="dev"))
    (tmp_path / "lines.json").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(w.rsplit(" ", 2)[-2:], r) for w, r in read_rows(str(tmp_path / "lines.json"))] == [
        (["line", "1"], {"a": 1}), (["line", "3"], {"a": 2})]


@pytest.mark.parametrize("split", ["train[:50%]", "train[50%:]", "train[10%:35%]", "train[:7]", "train[3:]",
                                   "train[-4:]", "train[2:-3]", "train[33%:-20%]", "train[5%:-9]", "train[:100%]", "train[-15%:]"])
def test_a_sliced_split_cuts_the_rows_as_datasets_does(tmp_path, split):
    """`split: train[:50%]` on a local clone: the rows `datasets.load_dataset` gives for the same slice of the same
    files, each with its own row number in its file."""
    import datasets

    folder = tmp_path / "clone" / "main"
    folder.mkdir(parents=True)
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(23)]
    pq.write_table(pa.Table.from_pylist(rows[:13]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[13:]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "test-00000-of-00001.parquet")
    files = sorted(str(p) for p in folder.glob("train-*.parquet"))
    want = [r["question"] for r in datasets.load_dataset("parquet", data_files={"train": files}, split=split,
                                                          cache_dir=str(tmp_path / "cache"))]
    got = list(read_rows(str(tmp_path / "clone"), split=split, subset="main"))
    assert [r["question"] for _, r in got] == want and want  # "train[5%:-9]": 5% to -9%, both bounds in percent
    first = int(want[0][1:])  # the row's own number in its file
    assert got[0][0].endswith(f"train-0000{0 if first < 13 else 1}-of-00002.parquet row {first % 13 + 1}")


def test_two_slices_of_one_split_share_no_row_and_a_bad_slice_is_one_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(10)])
    halves = [[r["prompt"] for _, r in read_rows(str(tmp_path / "train.jsonl"), split=s)]
              for s in ("train[:50%]", "train[50%:]")]
    assert halves == [[f"p{i}" for i in range(5)], [f"p{i}" for i in range(5, 10)]]
    for bad in ("train[:50]%", "train[a:b]", "train[1:2:3]", "train[:150%]"):
        with pytest.raises(RlhfchatError, match=r"split 'train\[.*(expected a split name or a slice|percentage)"):
            list(read_rows(str(tmp_path / "train.jsonl"), split=bad))


def test_reader_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": 2,,}\n')
    with pytest.raises(RlhfchatError, match=r"broken.jsonl line 2: invalid JSON"):
        list(read_rows(str(tmp_path / "broken.jsonl")))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(RlhfchatError, match=r"list.jsonl row 1: expected a JSON object, got int"):
        list(read_rows(str(tmp_path / "list.jsonl")))
    with pytest.raises(RlhfchatError, match=r"nowhere/x.parquet: file not found"):
        list(read_rows(str(tmp_path / "nowhere" / "x.parquet")))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(RlhfchatError, match=r"fake.parquet: not a readable parquet file"):
        list(read_rows(str(tmp_path / "fake.parquet")))


def test_hub_ids_go_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split, name=None, data_dir=None):
        calls.append((path, split, name, data_dir))
        if name is not None:
            raise ValueError(f"BuilderConfig {name!r} not found")  # as for Anthropic/hh-rlhf: subsets are folders
        return datasets.Dataset.from_list(HH_ROWS[:1] + HH_ROWS[4:])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rows = list(read_rows("Anthropic/hh-rlhf", split="test", subset="helpful-base", columns=hh_rlhf.COLUMNS))
    assert calls == [("Anthropic/hh-rlhf", "test", "helpful-base", None),
                     ("Anthropic/hh-rlhf", "test", None, "helpful-base")]
    assert rows[1] == ("Anthropic/hh-rlhf (test) row 2", HH_ROWS[4])
