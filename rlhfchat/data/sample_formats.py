"""The seven published layouts of the sample data (OASST1 trees, GPT4All, Alpaca, HH-RLHF, SHP, GSM8K) and the CLI.

    python -m rlhfchat.data.sample_formats data/sample [--seed 0]    # regenerate the committed files (byte-identical)

The content (tasks, reply kinds, quality levels, the held-out math pool) lives in samples.py; this module only lays
it out as each dataset is published and writes the files. A split other than train (OASST1 validation, HH-RLHF
test, SHP validation and test, GSM8K test) draws its math from `samples.held_out_problems()`, a train split never.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlhfchat.atomic import atomic_file
from rlhfchat.data.samples import (LEVEL, Task, ask, ask_alpaca, draw_math, draw_task, gsm8k_row, pair_kinds, reply,
                                   sft_kind, sibling_kinds)


# ----------------------------------------------------------------------------------------------------------------
# OASST1: message trees, one row per message.

_DETOX_KEYS = ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"]
_LABELS_ASSISTANT = ["spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
                     "sexual_content", "quality", "toxicity", "humor", "helpfulness", "creativity", "violence"]
_LABELS_PROMPTER = ["spam", "lang_mismatch", "pii", "not_appropriate", "hate_speech", "sexual_content", "quality",
                    "toxicity", "humor", "creativity", "violence"]
OASST1_SCHEMA = pa.schema([
    ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
    ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
    ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", pa.int32()),
    ("synthetic", pa.bool_()), ("model_name", pa.string()),
    ("detoxify", pa.struct([(k, pa.float64()) for k in _DETOX_KEYS])),
    ("message_tree_id", pa.string()), ("tree_state", pa.string()),
    ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
    ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int32()))])),
])
# A few non-English math trees: (question, answer sentence, evasive reply).
_FOREIGN = {"de": ("Was ist {a} {op} {b}?", "Die Antwort ist {c}.", "Ich weiß es nicht."),
            "es": ("¿Cuánto es {a} {op} {b}?", "La respuesta es {c}.", "No lo sé.")}
_FOLLOW_UP = ["Thanks! ", "Great, thank you. ", "OK. Next question. "]
_SPAM = ["Buy cheap watches at my shop!!!", "asdf asdf asdf", "Click here to win a prize."]


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class _Tree:
    """Builds the rows of one OASST1 message tree in creation order."""

    def __init__(self, rng: random.Random, users: list[str], start: datetime, lang: str):
        self.rng, self.users, self.clock, self.lang = rng, users, start, lang
        self.rows: list[dict[str, Any]] = []
        self.tree_id: str | None = None

    def add(self, text: str, role: str, parent: dict | None, level: int, rank: int | None = None,
            deleted: bool = False, review_ok: bool = True) -> dict[str, Any]:
        rng = self.rng
        self.clock += timedelta(minutes=rng.randint(5, 600), seconds=rng.randint(0, 59),
                                microseconds=rng.randint(0, 999999))
        mid = _uid(rng)
        self.tree_id = self.tree_id or mid
        reviews = rng.randint(3, 5)
        bad = 1.0 - level / 3
        detox = None if rng.random() < 0.1 else {
            k: round(rng.uniform(0.0001, 0.002) + (0.1 * bad * rng.random() if k in ("toxicity", "insult") else 0), 6)
            for k in _DETOX_KEYS}
        names = _LABELS_ASSISTANT if role == "assistant" else _LABELS_PROMPTER
        value = {"quality": 1 - bad * 0.8, "helpfulness": 1 - bad * 0.9, "fails_task": bad * 0.8,
                 "spam": 1.0 if level < 0 else 0.0}
        labels = None if rng.random() < 0.1 else {
            "name": names,
            "value": [round(min(1.0, max(0.0, value.get(n, 0.0) + rng.uniform(-0.1, 0.1))), 4) if n in value
                      else round(rng.uniform(0, 0.1), 4) for n in names],
            "count": [reviews] * len(names)}
        emojis = None if rng.random() < 0.3 else (
            {"name": ["+1", "_skip_labeling"], "count": [rng.randint(1, 9), 1]} if level >= 2
            else {"name": ["-1", "_skip_reply"], "count": [rng.randint(1, 9), rng.randint(1, 3)]})
        row = {"message_id": mid, "parent_id": parent["message_id"] if parent else None,
               "user_id": rng.choice(self.users),
               "created_date": self.clock.isoformat(), "text": text, "role": role, "lang": self.lang,
               "review_count": reviews, "review_result": review_ok, "deleted": deleted, "rank": rank,
               "synthetic": False, "model_name": None, "detoxify": detox, "message_tree_id": self.tree_id,
               "tree_state": "ready_for_export", "emojis": emojis, "labels": labels}
        self.rows.append(row)
        return row

    def replies(self, task: Task, parent: dict) -> dict[str, Any] | None:
        """Competing assistant replies to `parent`; returns the best one if it is good."""
        rng = self.rng
        if rng.random() < 0.12:  # a lone reply: nothing to rank it against
            kind = sft_kind(rng)
            row = self.add(reply(task, kind, rng), "assistant", parent, LEVEL[kind])
            return row if kind == "good" else None
        kinds = sibling_kinds(rng)
        order = list(range(len(kinds)))
        rng.shuffle(order)  # written in creation order, not rank order
        rows = {i: self.add(reply(task, kinds[i], rng), "assistant", parent, LEVEL[kinds[i]], rank=i)
                for i in order}
        if rng.random() < 0.08:  # came in after ranking: unranked
            self.add(reply(task, "good", rng), "assistant", parent, 3)
        return rows[0] if kinds[0] == "good" else None


def _oasst1_split(t: int) -> str:
    """The split of the t-th tree (OASST1 splits by tree): one in 20 is validation."""
    return "validation" if t % 20 == 19 else "train"


def _oasst1_trees(rng: random.Random, n_trees: int) -> list[list[dict[str, Any]]]:
    users = [_uid(rng) for _ in range(60)]
    start = datetime(2023, 2, 1, tzinfo=timezone.utc)
    trees = []
    for t in range(n_trees):
        held_out = _oasst1_split(t) != "train"
        start += timedelta(hours=rng.randint(1, 12))
        lang = "en" if t % 25 else ("de" if t % 50 else "es")
        tree = _Tree(rng, users, start, lang)
        if lang != "en":
            question, answer, evasive = _FOREIGN[lang]
            f = draw_math(rng, held_out).fields
            root = tree.add(question.format(**f), "prompter", None, 3)
            texts = [f"{f['worked']}. " + answer.format(**f), f"{f['c']}.", evasive]
            for rank in rng.sample(range(3), 3):
                tree.add(texts[rank], "assistant", root, 3 - rank, rank=rank)
            trees.append(tree.rows)
            continue
        task = draw_task(rng, held_out=held_out)
        root = tree.add(ask(task, rng), "prompter", None, 3)
        best = tree.replies(task, root)
        if best is not None and rng.random() < 0.4:
            follow_task = draw_task(rng, held_out=held_out)
            follow = tree.add(rng.choice(_FOLLOW_UP) + ask(follow_task, rng), "prompter", best, 3)
            tree.replies(follow_task, follow)
        if rng.random() < 0.06:  # deleted by a moderator, sometimes after someone answered it
            gone = tree.add(rng.choice(_SPAM), "assistant", root, -1, deleted=True)
            if rng.random() < 0.5:
                more = draw_task(rng, held_out=held_out)
                q = tree.add(ask(more, rng), "prompter", gone, 3)
                tree.add(reply(more, "good", rng), "assistant", q, 3)
        if rng.random() < 0.05:  # failed review
            tree.add(reply(task, "repeated", rng), "assistant", root, 0, review_ok=False)
        trees.append(tree.rows)
    return trees


# ----------------------------------------------------------------------------------------------------------------
# GPT4All and Alpaca: instruction/response rows.

def _gpt4all_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        task = draw_task(rng)
        source = "pacovaldez/stackoverflow-questions" if task.skill == "code" else "laion/unified_chip2"
        rows.append({"prompt": ask(task, rng), "response": reply(task, sft_kind(rng), rng), "source": source})
    return rows


_ALPACA_HEAD = ("Below is an instruction that describes a task{}. "
                "Write a response that appropriately completes the request.\n\n")


def _alpaca_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        task = draw_task(rng)
        instruction, inp = ask_alpaca(task, rng)
        output = reply(task, sft_kind(rng), rng)
        if inp:
            text = (_ALPACA_HEAD.format(", paired with an input that provides further context")
                    + f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n{output}")
        else:
            text = _ALPACA_HEAD.format("") + f"### Instruction:\n{instruction}\n\n### Response:\n{output}"
        rows.append({"instruction": instruction, "input": inp, "output": output, "text": text})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GSM8K: question/answer rows, the answer worked lines ending "#### N"; the test split holds held-out problems.

def _gsm8k_rows(rng: random.Random, n: int, pool: str) -> list[dict[str, str]]:
    return [gsm8k_row(draw_math(rng, pool=pool), rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# HH-RLHF and SHP: preference pairs.

def _hh_split(i: int) -> str:
    return "test" if i % 10 == 9 else "train"


def _hh_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        held_out = _hh_split(i) != "train"
        transcript = ""
        for _turn in range(rng.choices([0, 1, 2], [0.55, 0.35, 0.10])[0]):
            earlier = draw_task(rng, held_out=held_out)
            transcript += f"\n\nHuman: {ask(earlier, rng)}\n\nAssistant: {reply(earlier, 'good', rng)}"
        task = draw_task(rng, held_out=held_out)
        opener = rng.choice(_FOLLOW_UP) if transcript else ""
        transcript += f"\n\nHuman: {opener}{ask(task, rng)}\n\nAssistant: "
        chosen, rejected = pair_kinds(rng)
        rows.append({"chosen": transcript + reply(task, chosen, rng),
                     "rejected": transcript + reply(task, rejected, rng)})
    return rows


_SHP_DOMAIN = {"math": "askscience", "code": "askengineers", "grammar": "askacademia"}
_SHP_BODY = {"math": ["I am checking my homework.", "My kid asked me and I want to be sure.", "Quick question."],
             "code": ["I am learning Python.", "I am new to programming.", "This is for a class."],
             "grammar": ["I am writing an essay.", "English is not my first language.", "My teacher marked it."]}
_SCORE = {3: (100, 400), 2: (20, 50), 1: (4, 10), 0: (2, 3)}  # every pair has score_ratio >= 2


def _b36(rng: random.Random, width: int) -> str:
    return "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(width))


def _shp_rows(rng: random.Random, n_posts: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(domain, split, row) for every preference of every post; SHP splits by post, 90/5/5."""
    out = []
    t0 = 1609459200  # 2021-01-01
    for p in range(n_posts):
        split = "train" if p % 20 < 18 else ("validation" if p % 20 == 18 else "test")
        task = draw_task(rng, held_out=split != "train")
        post_id, posted = _b36(rng, 6), t0 + rng.randint(0, 60_000_000)
        history = f"{ask(task, rng)} {rng.choice(_SHP_BODY[task.skill])}"
        ratio = round(rng.uniform(0.8, 1.0), 2)
        # Better comments are written later (SHP keeps a preference only then), and score higher.
        comments, when = [], posted
        for kind in reversed(sibling_kinds(rng)):
            when += rng.randint(30, 7200)
            comments.append({"id": _b36(rng, 7), "at": when, "score": rng.randint(*_SCORE[LEVEL[kind]]),
                             "text": reply(task, kind, rng), "level": LEVEL[kind]})
        for i, worse in enumerate(comments):
            for better in comments[i + 1:]:
                a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
                out.append((_SHP_DOMAIN[task.skill], split, {
                    "post_id": post_id, "domain": f"{_SHP_DOMAIN[task.skill]}_{split}", "upvote_ratio": ratio,
                    "history": history, "c_root_id_A": a["id"], "c_root_id_B": b["id"],
                    "created_at_utc_A": a["at"], "created_at_utc_B": b["at"], "score_A": a["score"],
                    "score_B": b["score"], "human_ref_A": a["text"], "human_ref_B": b["text"],
                    "labels": int(a is better), "seconds_difference": float(better["at"] - worse["at"]),
                    "score_ratio": better["score"] / worse["score"]}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing.

def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path, "wb") as f:
        f.write(_jsonl_bytes(rows))


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:  # no name, no time
        gz.write(_jsonl_bytes(rows))
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _schema(*names: str) -> pa.Schema:
    return pa.schema([(n, pa.string()) for n in names])


SHP_SCHEMA = pa.schema([
    ("post_id", pa.string()), ("domain", pa.string()), ("upvote_ratio", pa.float64()), ("history", pa.string()),
    ("c_root_id_A", pa.string()), ("c_root_id_B", pa.string()), ("created_at_utc_A", pa.int64()),
    ("created_at_utc_B", pa.int64()), ("score_A", pa.int64()), ("score_B", pa.int64()),
    ("human_ref_A", pa.string()), ("human_ref_B", pa.string()), ("labels", pa.int64()),
    ("seconds_difference", pa.float64()), ("score_ratio", pa.float64()),
])
GPT4ALL_SCHEMA = _schema("prompt", "response", "source")
GSM8K_SCHEMA = _schema("question", "answer")
ALPACA_SCHEMA = _schema("instruction", "input", "output", "text")
HH_SCHEMA = _schema("chosen", "rejected")
GSM8K_ROWS = {"train": 1000, "test": 100}


def write_samples(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the seven sample datasets (and a README) under `out_dir`; returns {dataset name: its folder}."""
    out_dir = Path(out_dir)
    rng = lambda name: random.Random(f"{seed}:{name}")  # one stream per dataset: editing one leaves the others
    table: list[tuple[str, ...]] = []  # README rows: folder, published as, used for, files, rows

    trees = _oasst1_trees(rng("oasst1"), 360)
    splits = {s: [r for i, t in enumerate(trees) if _oasst1_split(i) == s for r in t] for s in ("train", "validation")}
    for split, rows in splits.items():
        _write_parquet(out_dir / "oasst1" / f"{split}.parquet", rows, OASST1_SCHEMA)
    table.append(("oasst1", "OpenAssistant/oasst1", "SFT; preferences from sibling ranks",
                  "train.parquet, validation.parquet",
                  f"{len(trees)} trees, {len(splits['train'])} + {len(splits['validation'])} messages"))

    rows = _gpt4all_rows(rng("gpt4all"), 700)
    _write_parquet(out_dir / "gpt4all" / "train.parquet", rows, GPT4ALL_SCHEMA)
    table.append(("gpt4all", "nomic-ai/gpt4all_prompt_generations", "SFT", "train.parquet", f"{len(rows)} rows"))

    rows = _alpaca_rows(rng("alpaca"), 700)
    _write_parquet(out_dir / "alpaca" / "train.parquet", rows, ALPACA_SCHEMA)
    table.append(("alpaca", "tatsu-lab/alpaca", "SFT", "train.parquet", f"{len(rows)} rows"))

    rows = _hh_rows(rng("hh_rlhf"), 800)
    hh = {s: [r for i, r in enumerate(rows) if _hh_split(i) == s] for s in ("train", "test")}
    for split, part in hh.items():
        _write_jsonl_gz(out_dir / "hh_rlhf" / "helpful-base" / f"{split}.jsonl.gz", part)
    table.append(("hh_rlhf", "Anthropic/hh-rlhf", "preferences", "helpful-base/{train,test}.jsonl.gz",
                  f"{len(hh['train'])} + {len(hh['test'])} pairs"))

    shp = _shp_rows(rng("shp"), 360)
    files: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for domain, split, row in shp:
        files.setdefault((domain, split), []).append(row)
    for (domain, split), part in sorted(files.items()):
        _write_jsonl(out_dir / "shp" / domain / f"{split}.jsonl", part)
    n = {s: sum(len(v) for (_, split), v in files.items() if split == s) for s in ("train", "validation", "test")}
    table.append(("shp", "stanfordnlp/SHP", "preferences", f"{{{','.join(sorted(_SHP_DOMAIN.values()))}}}/"
                  "{train,validation,test}.jsonl", f"{n['train']} + {n['validation']} + {n['test']} pairs, 360 posts"))

    gsm8k = {"train": _gsm8k_rows(rng("gsm8k:train"), GSM8K_ROWS["train"], pool="rl"),
             "test": _gsm8k_rows(rng("gsm8k:test"), GSM8K_ROWS["test"], pool="held_out")}
    for split, part in gsm8k.items():
        _write_parquet(out_dir / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet", part, GSM8K_SCHEMA)
    table.append(("gsm8k", "openai/gsm8k", "SFT; prompts with references", "main/{train,test}-00000-of-00001.parquet",
                  f"{len(gsm8k['train'])} + {len(gsm8k['test'])} rows"))

    with atomic_file(out_dir / "README.md") as f:
        rows_md = "\n".join(f"| `{a}/` | `{b}` | {c} | `{d}` | {e} |" for a, b, c, d, e in table)
        f.write(_README.format(seed=seed, table=rows_md))
    return {name: out_dir / name for name, *_ in table}


_README = """# Sample data

Small synthetic stand-ins for the six StableVicuna data sources and GSM8K, written in their published formats so that
the data stage and the tiny pipeline run offline. Made by `rlhfchat/data/samples.py` (the content; its docstring
says what is in the rows and why) and `rlhfchat/data/sample_formats.py` (the layouts); do not edit by hand.
Regenerate with

    python -m rlhfchat.data.sample_formats data/sample --seed {seed}

and `tests/test_samples.py` checks that the result matches these files.

Three skills (basic math with worked solutions, small Python functions, grammar fixes), each answered well,
tersely, wrongly or unhelpfully. Instruction data is mostly good answers and never wrong; every preference prefers a
correct and better-formed answer. In all, about 2,000 instruction conversations, 600 GSM8K-style worked problems
and 2,100 English preference pairs. The math of every split other than train comes from a pool of held-out problems
that no train split holds in any phrasing, not even as a step of a worked solution (`held_out_problems()`); the
`rlhfchat_math` eval task is that pool. Math is graded by `expected_math_answer(prompt)` (the last "A op B" in the
question) and `extract_answer(reply)` (the last integer in the reply); GSM8K rows carry their answer (`#### N`).

| folder | published as | used for | files | rows |
|---|---|---|---|---|
{table}

OASST1 holds deleted messages (some with replies under them), messages that failed review, unranked replies and
a few German and Spanish trees, which an adapter should drop or filter by `lang`. SHP publishes its files as
`train.json` etc. holding JSON lines; here they are named `.jsonl`. GSM8K's answers carry calculator annotations
(`<<13*4=52>>`) as published. Parquet row contents (not bytes) and gzip contents are what stays the same across
pyarrow and zlib versions.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhfchat.data.sample_formats",
                                     description="Write the bundled sample data (byte-identical for the same seed).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_samples(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
