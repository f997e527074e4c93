"""Benchmark of the data stage on synthetic files of the published sizes and formats.

    rlhfchat bench data --scale 1.0            # OASST1 161k messages, GPT4All 437k, Alpaca 52k, HH 161k, SHP 349k
    rlhfchat bench data --scale 0.1 --workdir /tmp/bench-data --keep

Writes the five datasets as published (parquet for oasst1, gpt4all and alpaca; jsonl.gz for hh-rlhf; JSON lines
for SHP), with text lengths near the real ones and the edge cases the adapters handle (deleted and unranked
messages, empty responses, duplicates, low score ratios), then runs `rlhfchat data` on the recipe of the issue
in a subprocess and prints one JSON line: rows (input rows), seconds, rows_per_s, peak_rss_mb (the stage
process's own peak resident memory), scale. Generated files are reused when `--workdir` already holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhfchat.errors import RlhfchatError

SIZES = {"oasst1": 161_443, "gpt4all": 437_604, "alpaca": 52_002, "hh_rlhf": 160_800, "shp": 348_718}
FILES = {"oasst1": "oasst1/data/train-00000-of-00001.parquet",
         "gpt4all": "gpt4all/data/train-00000-of-00001.parquet",
         "alpaca": "alpaca/data/train-00000-of-00001.parquet",
         "hh_rlhf": "hh-rlhf/helpful-base/train.jsonl.gz",
         "shp": "shp/askscience/train.json"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the published sizes (default 1.0)")
    parser.add_argument("--workdir", default=None,
                        help="where to write the synthetic files and the run (default: a temporary folder, removed "
                        "afterwards); files already there at the same scale are reused")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale <= 0:
        raise RlhfchatError(f"--scale: expected a number above 0, got {args.scale}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rlhfchat-bench-data-"))
    try:
        rows = generate(workdir, args.scale, args.seed)
        recipe = write_recipe(workdir)
        result = time_stage(recipe, workdir)
        result = {"bench": "data", "scale": args.scale, "rows": rows, "seconds": round(result["seconds"], 2),
                  "rows_per_s": round(rows / result["seconds"]), "peak_rss_mb": round(result["peak_rss_mb"]),
                  "records": result["records"]}
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def time_stage(recipe: Path, workdir: Path) -> dict[str, Any]:
    """Run `rlhfchat data RECIPE` in a child process; its wall time and its own peak RSS (from wait4)."""
    log = workdir / "stage.log"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "rlhfchat.cli", "data", str(recipe)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RlhfchatError(f"the data stage failed with status {proc.returncode}: {tail[0]}")
    card = json.loads((workdir / "run" / "data" / "card.json").read_text())
    records = {kind: card[kind]["train"] + card[kind]["eval"] for kind in ("sft", "preferences", "prompts")}
    # ru_maxrss is in kilobytes on Linux, bytes on macOS
    peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"seconds": seconds, "peak_rss_mb": peak, "records": records}


def write_recipe(workdir: Path) -> Path:
    import yaml

    p = {name: str(workdir / path) for name, path in FILES.items()}
    data = {
        "eval_fraction": 0.05,
        "sft": [{"source": "oasst1", "path": p["oasst1"]}, {"source": "gpt4all", "path": p["gpt4all"]},
                {"source": "alpaca", "path": p["alpaca"]}],
        "preferences": [{"source": "oasst1", "path": p["oasst1"]}, {"source": "hh_rlhf", "path": p["hh_rlhf"]},
                        {"source": "shp", "path": p["shp"], "min_score_ratio": 2.0}],
        "prompts": [{"source": "oasst1", "path": p["oasst1"]}],
    }
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bench-data", "output_dir": str(workdir / "run"), "data": data},
                                     sort_keys=False))
    return recipe


# --------------------------------------------------------------------------------------------------------------
# Synthetic data in the published formats


def generate(workdir: Path, scale: float, seed: int) -> int:
    """Write the five datasets under `workdir` (unless already there at this scale); returns the input rows."""
    marker = workdir / "synthetic.json"
    sizes = {name: max(2, round(n * scale)) for name, n in SIZES.items()}
    want = {"scale": scale, "seed": seed, "sizes": sizes}
    if marker.is_file() and json.loads(marker.read_text()) == want and all((workdir / f).is_file()
                                                                            for f in FILES.values()):
        return sum(sizes.values())
    import numpy as np

    start = time.perf_counter()
    print(f"writing synthetic data ({sum(sizes.values()):,} rows, scale {scale}) to {workdir}", file=sys.stderr)
    rng = np.random.default_rng(seed)
    text = _Text(rng, words=max(100_000, round(3_000_000 * min(scale, 1.0))))
    for name, make in (("oasst1", _oasst1), ("gpt4all", _gpt4all), ("alpaca", _alpaca), ("hh_rlhf", _hh_rlhf),
                       ("shp", _shp)):
        path = workdir / FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path, sizes[name], rng, text)
    marker.write_text(json.dumps(want))
    print(f"synthetic data written in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return sum(sizes.values())


class _Text:
    """Random text of given lengths: slices of one long string of pseudo-words (fast, and nearly all distinct)."""

    def __init__(self, rng, words: int):
        import numpy as np

        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=4000)]
        vocab[:6] = ["the", "a", "is", "Human:", "of", "and"]  # "Human:" inside text, as in real transcripts
        picked = np.array(vocab)[rng.integers(0, len(vocab), size=words)]
        self.corpus = " ".join(picked.tolist()) + ". "
        self.rng = rng

    def __call__(self, n: int, lo: int, hi: int) -> list[str]:
        lengths = self.rng.integers(lo, hi, size=n)
        starts = self.rng.integers(0, len(self.corpus) - hi - 1, size=n)
        c = self.corpus
        return [c[s:s + k].strip() or "x" for s, k in zip(starts.tolist(), lengths.tolist())]


def _write_parquet(path: Path, columns: dict[str, Any], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns, schema=schema)
    pq.write_table(table, path, row_group_size=50_000)


def _oasst1(path: Path, n: int, rng, text: _Text) -> None:
    import numpy as np
    import pyarrow as pa

    ids: list[str] = []
    parents: list[str | None] = []
    roles: list[str] = []
    ranks: list[int | None] = []
    trees: list[str] = []
    serial = rng.integers(0, 1 << 40, size=n).tolist()

    def add(parent: str | None, role: str, rank: int | None, tree: str | None) -> str:
        mid = f"{len(ids):08x}-0000-4000-8000-{serial[len(ids)]:012x}"
        ids.append(mid)
        parents.append(parent)
        roles.append(role)
        ranks.append(rank)
        trees.append(tree or mid)
        return mid

    while len(ids) < n:  # trees: prompter -> 1-3 assistant replies (ranked when 2+) -> follow-ups, depth <= 4
        root = add(None, "prompter", None, None)
        frontier = [(root, 0)]
        while frontier and len(ids) < n:
            node, depth = frontier.pop()
            k = int(rng.integers(1, 4))
            ranked = k >= 2 and rng.random() > 0.1  # some replies never got ranked
            for r in rng.permutation(k).tolist():
                if len(ids) >= n:
                    break
                reply = add(node, "assistant", r if ranked else None, root)
                if depth < 3 and len(ids) < n and rng.random() < 0.5:
                    frontier.append((add(reply, "prompter", 0, root), depth + 1))
    count = len(ids)
    is_prompter = np.asarray(roles) == "prompter"
    texts_p = text(count, 20, 400)
    texts_a = text(count, 100, 1500)
    texts = [tp if p else ta for p, tp, ta in zip(is_prompter.tolist(), texts_p, texts_a)]
    langs = rng.choice(["en", "es", "ru", "de", "zh", "fr", "pt-BR"], p=[.45, .25, .1, .08, .05, .04, .03], size=count)
    u = rng.random(count)
    deleted = (u < 0.02).tolist()
    review = [False if 0.02 <= x < 0.04 else (None if 0.04 <= x < 0.07 else True) for x in u.tolist()]
    created = [f"2023-02-{1 + i * 27 // max(count, 1):02d}T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:"
               f"{i % 60:02d}.000000+00:00" for i in range(count)]
    struct = pa.struct([("toxicity", pa.float64())])
    _write_parquet(path, {
        "message_id": ids, "parent_id": parents, "user_id": [f"user-{i % 13000}" for i in range(count)],
        "created_date": created, "text": texts, "role": roles, "lang": langs.tolist(),
        "review_count": pa.array(rng.integers(0, 6, size=count), pa.int32()),
        "review_result": pa.array(review, pa.bool_()), "deleted": deleted, "rank": pa.array(ranks, pa.int32()),
        "synthetic": [False] * count, "model_name": pa.nulls(count, pa.string()),
        "detoxify": pa.nulls(count, struct), "message_tree_id": trees,
        "tree_state": ["ready_for_export"] * count,
    })


def _gpt4all(path: Path, n: int, rng, text: _Text) -> None:
    prompts, responses = text(n, 20, 600), text(n, 100, 2000)
    for i in rng.integers(0, n, size=n // 200).tolist():  # empty responses
        responses[i] = ""
    for i in rng.integers(1, n, size=n // 100).tolist():  # exact duplicates of an earlier row
        j = int(rng.integers(0, i))
        prompts[i], responses[i] = prompts[j], responses[j]
    sources = rng.choice(["unified_chip2", "pacovaldez/stackoverflow-questions", "laion/unified_p3"], size=n)
    _write_parquet(path, {"prompt": prompts, "response": responses, "source": sources.tolist()})


def _alpaca(path: Path, n: int, rng, text: _Text) -> None:
    instructions, outputs = text(n, 20, 150), text(n, 10, 600)
    inputs = [t if keep else "" for t, keep in zip(text(n, 10, 200), (rng.random(n) < 0.4).tolist())]
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    texts = [f"{head}\n\n### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:\n{o}" if x else
             f"{head}\n\n### Instruction:\n{i}\n\n### Response:\n{o}" for i, x, o in zip(instructions, inputs, outputs)]
    _write_parquet(path, {"instruction": instructions, "input": inputs, "output": outputs, "text": texts})


def _hh_rlhf(path: Path, n: int, rng, text: _Text) -> None:
    import gzip

    turns = rng.integers(1, 5, size=n).tolist()
    humans, assistants = text(n * 4, 20, 200), text(n * 4, 50, 500)
    chosen, rejected = text(n, 50, 500), text(n, 50, 500)
    bad = set(rng.integers(0, n, size=max(1, n // 300)).tolist())
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for i, t in enumerate(turns):
            parts = []
            for j in range(t):
                parts.append(f"\n\nHuman: {humans[4 * i + j]}")
                if j < t - 1:
                    parts.append(f"\n\nAssistant: {assistants[4 * i + j]}")
            prompt = "".join(parts)
            other = prompt + "\n\nHuman: and?" if i in bad else prompt
            f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {chosen[i]}",
                                "rejected": f"{other}\n\nAssistant: {rejected[i]}"}) + "\n")


def _shp(path: Path, n: int, rng, text: _Text) -> None:
    posts = max(1, n // 9)
    histories = text(posts, 100, 1500)
    post_of = rng.integers(0, posts, size=n).tolist()
    ref_a, ref_b = text(n, 50, 800), text(n, 50, 800)
    ratios = (1.0 + rng.exponential(2.0, size=n)).tolist()
    labels = (rng.random(n) < 0.5).astype(int).tolist()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            p = post_of[i]
            score_b = int(rng.integers(1, 50)) if i % 64 == 0 else 10
            f.write(json.dumps({
                "post_id": f"p{p:06x}", "domain": "askscience_train", "upvote_ratio": 0.98,
                "history": histories[p], "c_root_id_A": f"a{i:07x}", "c_root_id_B": f"b{i:07x}",
                "created_at_utc_A": 1_500_000_000 + i, "created_at_utc_B": 1_500_000_100 + i,
                "score_A": round(score_b * ratios[i]) if labels[i] else score_b,
                "score_B": score_b if labels[i] else round(score_b * ratios[i]),
                "human_ref_A": ref_a[i], "human_ref_B": ref_b[i], "labels": labels[i],
                "seconds_difference": 100.0, "score_ratio": ratios[i],
            }) + "\n")
