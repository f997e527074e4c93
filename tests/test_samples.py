"""The bundled sample data: reproducible, in the published schemas, and with a preference worth learning.

    pytest tests/test_samples.py
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfchat.data.sample_formats import write_samples
from rlhfchat.data.samples import expected_math_answer, extract_answer, skill_of

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

# Column types as on the hub (datasets features -> arrow).
STR, I32, I64, F64, BOOL = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
OASST1 = {"message_id": STR, "parent_id": STR, "user_id": STR, "created_date": STR, "text": STR, "role": STR,
          "lang": STR, "review_count": I32, "review_result": BOOL, "deleted": BOOL, "rank": I32, "synthetic": BOOL,
          "model_name": STR,
          "detoxify": pa.struct([(k, F64) for k in ("toxicity", "severe_toxicity", "obscene", "identity_attack",
                                                     "insult", "threat", "sexual_explicit")]),
          "message_tree_id": STR, "tree_state": STR,
          "emojis": pa.struct([("name", pa.list_(STR)), ("count", pa.list_(I32))]),
          "labels": pa.struct([("name", pa.list_(STR)), ("value", pa.list_(F64)), ("count", pa.list_(I32))])}
GPT4ALL = {"prompt": STR, "response": STR, "source": STR}
ALPACA = {"instruction": STR, "input": STR, "output": STR, "text": STR}
SHP = {"post_id": str, "domain": str, "upvote_ratio": float, "history": str, "c_root_id_A": str,
       "c_root_id_B": str, "created_at_utc_A": int, "created_at_utc_B": int, "score_A": int, "score_B": int,
       "human_ref_A": str, "human_ref_B": str, "labels": int, "seconds_difference": float, "score_ratio": float}


def _jsonl(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _parquet(folder: str) -> list[dict]:
    return [r for p in sorted((SAMPLE / folder).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _hh_split(transcript: str) -> tuple[str, str, str]:
    """(everything before the last reply, the last human turn, the last reply)."""
    head, reply = transcript.rsplit("\n\nAssistant: ", 1)
    return head, head.rsplit("\n\nHuman: ", 1)[1], reply


@functools.cache
def _pairs() -> tuple[tuple[str, str, str, str], ...]:
    """(source, question, chosen, rejected) for every English preference in the three preference sources."""
    out = []
    rows = [r for r in _parquet("oasst1") if r["lang"] == "en"]
    by_id = {r["message_id"]: r for r in rows}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["rank"] is not None and not r["deleted"] and r["review_result"]:
            groups.setdefault(r["parent_id"], []).append(r)
    for parent, sibs in groups.items():
        sibs.sort(key=lambda r: r["rank"])
        out += [("oasst1", by_id[parent]["text"], a["text"], b["text"])
                for i, a in enumerate(sibs) for b in sibs[i + 1:]]
    for path in sorted((SAMPLE / "hh_rlhf").rglob("*.jsonl.gz")):
        for r in _jsonl(path):
            _, question, chosen = _hh_split(r["chosen"])
            out.append(("hh_rlhf", question, chosen, _hh_split(r["rejected"])[2]))
    for path in sorted((SAMPLE / "shp").rglob("*.jsonl")):
        for r in _jsonl(path):
            a, b = r["human_ref_A"], r["human_ref_B"]
            out.append(("shp", r["history"], a, b) if r["labels"] == 1 else ("shp", r["history"], b, a))
    return tuple(out)


@functools.cache
def _instructions() -> tuple[tuple[str, str, str], ...]:
    """(source, question, reply) for the instruction data: GPT4All, Alpaca and OASST1's best English replies."""
    out = [("gpt4all", r["prompt"], r["response"]) for r in _parquet("gpt4all")]
    out += [("alpaca", f"{r['instruction']}\n\n{r['input']}".strip(), r["output"]) for r in _parquet("alpaca")]
    rows = [r for r in _parquet("oasst1") if r["lang"] == "en" and not r["deleted"] and r["review_result"]]
    by_id = {r["message_id"]: r for r in rows}
    out += [("oasst1", by_id[r["parent_id"]]["text"], r["text"]) for r in rows
            if r["role"] == "assistant" and r["rank"] == 0 and r["parent_id"] in by_id]
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------

def test_committed_files_regenerate_exactly(tmp_path):
    written = write_samples(tmp_path / "a", seed=0)
    assert set(written) == {"oasst1", "gpt4all", "alpaca", "hh_rlhf", "shp", "gsm8k"}
    ours = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file())
    assert ours == committed
    for rel in ours:
        new, old = tmp_path / "a" / rel, SAMPLE / rel
        if rel.suffix == ".parquet":  # parquet bytes carry the writer's version: compare schema and rows
            a, b = pq.read_table(new), pq.read_table(old)
            assert a.schema == b.schema and a.to_pylist() == b.to_pylist(), rel
            if pq.read_metadata(new).created_by == pq.read_metadata(old).created_by:  # same writer: same bytes
                assert new.read_bytes() == old.read_bytes(), rel
        elif rel.suffix == ".gz":  # deflate output may differ between zlib builds: compare what it holds
            assert gzip.decompress(new.read_bytes()) == gzip.decompress(old.read_bytes()), rel
        else:
            assert new.read_bytes() == old.read_bytes(), rel
    # On one machine, every byte is the same every time.
    write_samples(tmp_path / "b", seed=0)
    for rel in ours:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_small_enough_for_the_repo():
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 5_000_000


def test_published_schemas():
    for folder, expected in (("oasst1", OASST1), ("gpt4all", GPT4ALL), ("alpaca", ALPACA)):
        for path in (SAMPLE / folder).glob("*.parquet"):
            schema = pq.read_schema(path)
            assert schema.names == list(expected), path
            for name, typ in expected.items():
                assert schema.field(name).type == typ, (path, name)
    hh = sorted((SAMPLE / "hh_rlhf" / "helpful-base").glob("*.jsonl.gz"))
    assert [p.name for p in hh] == ["test.jsonl.gz", "train.jsonl.gz"]
    for path in hh:
        assert gzip.open(path).read(2) == b'{"'  # gzip of JSON lines, as published
        for r in _jsonl(path):
            assert list(r) == ["chosen", "rejected"] and all(isinstance(v, str) for v in r.values())
    for path in (SAMPLE / "shp").rglob("*.jsonl"):
        for r in _jsonl(path):
            assert list(r) == list(SHP), path
            assert all(isinstance(r[k], t) for k, t in SHP.items()), r
            assert r["domain"] == f"{path.parent.name}_{path.stem}"
            better, worse = ("A", "B") if r["labels"] == 1 else ("B", "A")
            assert r[f"score_{better}"] > r[f"score_{worse}"]
            assert r["seconds_difference"] == r[f"created_at_utc_{better}"] - r[f"created_at_utc_{worse}"] >= 0
            assert r["score_ratio"] == pytest.approx(r[f"score_{better}"] / r[f"score_{worse}"])
    for r in _parquet("alpaca"):
        assert r["text"].endswith(f"### Response:\n{r['output']}")
        assert (f"### Input:\n{r['input']}\n\n" in r["text"]) == bool(r["input"])


def test_oasst1_trees_hold_what_an_adapter_must_handle():
    rows = _parquet("oasst1")
    by_id = {r["message_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    siblings: dict[str, list[int]] = {}
    for r in rows:
        assert r["tree_state"] == "ready_for_export" and r["synthetic"] is False and r["model_name"] is None
        if r["parent_id"] is None:
            assert r["role"] == "prompter" and r["message_tree_id"] == r["message_id"]
        else:
            parent = by_id[r["parent_id"]]
            assert parent["role"] != r["role"] and parent["message_tree_id"] == r["message_tree_id"]
            assert parent["created_date"] < r["created_date"]
            if r["rank"] is not None:
                siblings.setdefault(r["parent_id"], []).append(r["rank"])
    assert all(sorted(ranks) == list(range(len(ranks))) for ranks in siblings.values())
    deleted = {r["message_id"] for r in rows if r["deleted"]}
    assert deleted and any(r["parent_id"] in deleted for r in rows)  # a deleted message with replies under it
    assert any(r["review_result"] is False for r in rows)
    assert any(r["role"] == "assistant" and r["rank"] is None and not r["deleted"] for r in rows)
    assert {r["lang"] for r in rows} == {"en", "de", "es"}
    assert any(r["detoxify"] is None for r in rows) and any(r["emojis"] for r in rows)


def test_every_skill_in_every_dataset():
    seen = Counter((src, skill_of(q)) for src, q, *_ in _instructions() + _pairs())
    for src in ("gpt4all", "alpaca", "oasst1", "hh_rlhf", "shp"):
        for skill in ("math", "code", "grammar"):
            assert seen[(src, skill)] >= 30, (src, skill, seen)
    assert seen[("oasst1", None)] == seen[("hh_rlhf", None)] == 0


def test_hh_pairs_share_everything_but_the_last_reply():
    for path in (SAMPLE / "hh_rlhf").rglob("*.jsonl.gz"):
        for r in _jsonl(path):
            assert r["chosen"].startswith("\n\nHuman: ")
            head_c, _, reply_c = _hh_split(r["chosen"])
            head_r, _, reply_r = _hh_split(r["rejected"])
            assert head_c == head_r and reply_c != reply_r


def test_math_answers():
    assert expected_math_answer("What is 12 + 7?") == 19
    assert expected_math_answer("Calculate 9 minus 4.") == 5
    assert expected_math_answer("Thanks! How much is 6 times 7?") == 42
    assert expected_math_answer("Write a Python function that adds 3 to a number.") is None
    assert extract_answer("12 + 7 = 19. The answer is 19.") == 19
    assert extract_answer("I don't know. Figure it out yourself.") is None
    pairs = [(q, c, r) for _, q, c, r in _pairs() if skill_of(q) == "math"]
    assert len(pairs) > 300
    for q, chosen, rejected in pairs:
        want = expected_math_answer(q)
        assert extract_answer(chosen) == want, (q, chosen)
        # The rejected reply is wrong or has no answer, unless it is the bare right number under a worked one.
        assert extract_answer(rejected) != want or (rejected == f"{want}." and "The answer is" in chosen), (q, rejected)
    for _, q, reply in _instructions():  # instruction data is never wrong, only sometimes unhelpful
        if skill_of(q) == "math":
            assert extract_answer(reply) in (expected_math_answer(q), None), (q, reply)


def _code_of(reply: str) -> str:
    block = re.search(r"```python\n(.*?)```", reply, re.DOTALL)
    return block.group(1) if block else reply


def test_preferred_code_runs_and_preferred_grammar_fixes_the_sentence():
    for _, q, chosen, _ in _pairs():
        if skill_of(q) == "code":
            namespace: dict = {}
            exec(compile(_code_of(chosen), "<chosen>", "exec"), namespace)
            assert any(callable(v) for k, v in namespace.items() if not k.startswith("__")), chosen
        elif skill_of(q) == "grammar":
            original = re.search(r'"([^"]+)"', q).group(1)
            fixed = re.match(r'(?:The correct sentence is: ")?([^"]+)', chosen).group(1)
            assert fixed != original and fixed.split()[0] == original.split()[0], (q, chosen)


def test_instruction_data_is_mostly_good_but_not_all():
    good = re.compile(r"\. The answer is \d+\.$|^Here is a Python function|^The correct sentence is: ")
    for src in ("gpt4all", "alpaca", "oasst1"):
        replies = [reply for s, _, reply in _instructions() if s == src]
        share = sum(bool(good.search(r)) for r in replies) / len(replies)
        assert 0.5 < share < 0.9, (src, share)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z_]+|\d+|[^\sa-z_\d]", text.lower())


def test_bag_of_words_separates_chosen_from_rejected():
    """A linear model on word counts of the two final replies, held out by question, should mostly be right.

    What it cannot see (wrong numbers, wrong operators, the error swapped in) is left for the reward model.
    """
    pairs = _pairs()
    vocab = {w: i for i, w in enumerate(sorted({w for _, _, c, r in pairs for w in _words(c) + _words(r)}))}

    def bow(text: str) -> np.ndarray:
        v = np.zeros(len(vocab))
        for w in _words(text):
            v[vocab[w]] += 1
        return np.log1p(v)

    x = np.stack([bow(c) - bow(r) for _, _, c, r in pairs])
    test = np.array([hash_question(q) % 5 == 0 for _, q, _, _ in pairs])
    sign = np.where(np.arange(len(x)) % 2 == 0, 1.0, -1.0)  # half the pairs flipped: labels 1 and 0
    x, y = x * sign[:, None], (sign > 0).astype(float)
    x_train, y_train = x[~test], y[~test]
    w = np.zeros(x.shape[1])
    # Plain gradient descent on the logistic loss with a little L2. einsum, not @: these products are too small for
    # BLAS threads, which on a busy machine make them 30x slower.
    for _ in range(300):
        p = 1 / (1 + np.exp(-np.einsum("ij,j->i", x_train, w)))
        w -= 0.5 * (np.einsum("ij,i->j", x_train, p - y_train) / len(y_train) + 1e-3 * w)
    accuracy = float(((np.einsum("ij,j->i", x[test], w) > 0) == (y[test] > 0)).mean())
    print(f"bag-of-words held-out pairwise accuracy: {accuracy:.3f} on {int(test.sum())} pairs")
    assert accuracy > 0.85, accuracy


def hash_question(q: str) -> int:
    return sum(q.encode())  # stable across runs, unlike hash()


_TEXT_COLUMNS = {"oasst1": ["text"], "gpt4all": ["prompt", "response"], "alpaca": ["instruction", "input", "output"],
                 "hh_rlhf": ["chosen", "rejected"], "shp": ["history", "human_ref_A", "human_ref_B"],
                 "gsm8k": ["question", "answer"]}


def _texts(path: Path) -> list[str]:
    """The messages and replies of a data file's rows (not its ids and dates)."""
    rows = pq.read_table(path).to_pylist() if path.suffix == ".parquet" else _jsonl(path)
    columns = _TEXT_COLUMNS[path.relative_to(SAMPLE).parts[0]]
    return [r[c] for r in rows for c in columns]


def test_held_out_math_is_in_no_train_split_and_in_every_other():
    from rlhfchat.data.samples import held_out_problems, math_problems

    held = held_out_problems()
    files = [p for p in SAMPLE.rglob("*") if p.name.endswith((".parquet", ".jsonl", ".jsonl.gz"))]
    assert len(files) == 17
    for path in files:
        stated = set().union(*(math_problems(t) for t in _texts(path)))
        if path.name.startswith("train"):
            assert not stated & held, (path, sorted(stated & held)[:5])
        elif path.parent.name not in ("askacademia", "askengineers"):  # (SHP's grammar and code domains)
            # validation and test splits: math from the held-out pool (and the one-digit facts of its steps)
            assert len(stated & held) >= 3, path


def test_gsm8k_rows_as_published():
    from rlhfchat.data.gsm8k import split_answer
    from rlhfchat.data.samples import held_out_problems, math_problems

    for split, n in (("train", 1000), ("test", 100)):
        path = SAMPLE / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet"
        assert pq.read_schema(path).names == ["question", "answer"]
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == n and all(isinstance(v, str) for r in rows for v in r.values())
        for r in rows:
            lines = r["answer"].splitlines()
            assert len(lines) == 2 and re.fullmatch(r"#### \d+", lines[1]) and "<<" in lines[0], r
            steps, final = split_answer(r["answer"])
            asked = math_problems(r["question"], final)
            held = asked & held_out_problems()
            assert asked and (bool(held) if split == "test" else not held), r
        words = sum(expected_math_answer(r["question"]) is None for r in rows)
        assert 0.3 < words / n < 0.7  # about half are word problems


def test_rl_problems_are_only_in_gsm8ks_train_split():
    """The RL pool: neither held out nor stated by any other file, so RL on GSM8K's train split is on new problems."""
    from rlhfchat.data.samples import held_out_problems, math_problems, rl_problems

    rl, held = rl_problems(), held_out_problems()
    assert len(rl) > 50 and not rl & held
    for path in (p for p in SAMPLE.rglob("*") if p.name.endswith((".parquet", ".jsonl", ".jsonl.gz"))):
        stated = set().union(*(math_problems(t) for t in _texts(path)))
        if path.parent.name == "main" and path.name.startswith("train"):  # GSM8K's train split
            assert stated & rl == rl, path  # every one of them (81), with its answer
        else:
            assert not stated & rl, (path, sorted(stated & rl)[:5])
