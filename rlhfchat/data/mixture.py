"""The data stage: read every source of the recipe, mix, dedupe, split, and write canonical JSONL records.

    rlhfchat data recipes/tiny-cpu.yaml [key=value ...]

Writes `<output_dir>/data/{sft,preferences,prompts}.{train,eval}.jsonl` (the records of `schema.py`), `card.json`
and `<output_dir>/recipe.yaml`. For each kind, in order:

1. read each source through its adapter (`rlhfchat/data/<source>.py`), counting rows read and every drop reason;
2. dedupe: a record equal to an earlier one (`schema.record_key`: same messages, or same prompt/chosen/rejected),
   from the same source or an earlier one in the recipe, is dropped ("duplicate"); first occurrence wins;
3. weight: below 1 keeps a random round(n * weight) of the source's records, above 1 draws round(n * weight)
   with replacement (records never drawn count as "left out by weight"); then `max_examples` keeps a random subset;
4. shuffle everything with the recipe's seed and hold out `eval_fraction` (at least one record when the fraction
   is above 0 and there are two or more; copies of one record stay on one side, so nothing leaks into eval). A
   source marked `held_out` (a published test split) goes to eval whole; a kind with one holds out nothing else.

Every random draw comes from its own `random.Random(f"{seed}:{kind}:{i}")`, so the same recipe gives byte-identical
files and adding a source leaves the draws of the others alone. Everything is written into a temporary folder
beside `data/` and renamed at the end: a failed run leaves no half-written folder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from rlhfchat.atomic import atomic_dir, atomic_file, sweep, write_json
from rlhfchat.config import Recipe, SourceConfig, dump_recipe
from rlhfchat.data import readers
from rlhfchat.data.schema import KINDS, record_key
from rlhfchat.errors import RlhfchatError

_Record = tuple[str, bytes]  # (dedupe key, the record's JSON line without its newline)
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # as schema.write_jsonl writes, built once
_quote = json.encoder.encode_basestring  # a str as a JSON string, ensure_ascii=False


def build(recipe: Recipe) -> dict[str, Any]:
    """Run the data stage; returns the card (also written to data/card.json)."""
    data = recipe.data
    run_dir = recipe.run_dir
    existed = run_dir.exists()
    for kind in KINDS:  # fail fast on a missing file before reading anything
        for i, src in enumerate(getattr(data, kind)):
            with _naming(kind, i, src):
                readers.local_files(src.path, src.split, src.subset)
    card: dict[str, Any] = {"seed": recipe.seed, "eval_fraction": data.eval_fraction, "dedupe": data.dedupe}
    try:
        with atomic_dir(run_dir / "data") as tmp:
            for kind in KINDS:
                card[kind] = _build_kind(kind, getattr(data, kind), recipe, tmp)
            write_json(tmp / "card.json", card)
    except BaseException:
        if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    with atomic_file(run_dir / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))
    return card


def _build_kind(kind: str, sources: list[SourceConfig], recipe: Recipe, out: Path) -> dict[str, Any]:
    seen: set[str] | None = set() if recipe.data.dedupe else None
    pool: list[_Record] = []
    held: list[_Record] = []  # the records of held_out sources: all of them eval
    cards = []
    for i, src in enumerate(sources):
        stats: Counter = Counter()
        # 1. read the source through its adapter, dropping records seen before
        records, rows_read, n_records = _read_source(kind, i, src, seen, stats)
        # 2. weight, then cap, with this source's own random stream
        rng = random.Random(f"{recipe.seed}:{kind}:{i}")
        records = weigh(records, src.weight, rng, stats)
        if src.max_examples is not None and len(records) > src.max_examples:
            stats["over max_examples"] += len(records) - src.max_examples
            records = rng.sample(records, src.max_examples)
        cards.append({"index": i, "source": src.source, "path": src.path, "rows_read": rows_read,
                      "records": n_records, "dropped": dict(sorted(stats.items())), "kept": len(records),
                      **({"held_out": True} if src.held_out else {})})
        (held if src.held_out else pool).extend(records)
        del records
    seen = None
    # 3. shuffle the mixture and hold out the eval records (the held-out sources' records, else eval_fraction)
    random.Random(f"{recipe.seed}:{kind}:shuffle").shuffle(pool)
    random.Random(f"{recipe.seed}:{kind}:held_out").shuffle(held)
    eval_keys = set() if held else _eval_keys(pool, recipe.data.eval_fraction)
    # 4. write both files in the shuffled order, hashing as we go
    files = {}
    with open(out / f"{kind}.train.jsonl", "wb") as train, open(out / f"{kind}.eval.jsonl", "wb") as held_out:
        hashes = {"train": hashlib.sha256(), "eval": hashlib.sha256()}
        counts = {"train": 0, "eval": 0}
        for records, all_eval in ((pool, False), (held, True)):
            for key, line in records:
                split = "eval" if all_eval or key in eval_keys else "train"
                f = held_out if split == "eval" else train
                f.write(line)
                f.write(b"\n")
                hashes[split].update(line)
                hashes[split].update(b"\n")
                counts[split] += 1
    for split in ("train", "eval"):
        files[f"{kind}.{split}.jsonl"] = {"records": counts[split], "sha256": hashes[split].hexdigest()}
    return {"sources": cards, "train": counts["train"], "eval": counts["eval"], "files": files}


def _read_source(kind: str, i: int, src: SourceConfig, seen: set[str] | None,
                 stats: Counter) -> tuple[list[_Record], int, int]:
    """(records kept, rows read, records the adapter gave) for one source; `seen` holds the keys so far."""
    records: list[_Record] = []
    read = [0]
    n_records = 0
    with _naming(kind, i, src):
        module = importlib.import_module(f"rlhfchat.data.{src.source}")
        adapter = getattr(module, kind, None)
        if adapter is None:
            raise RlhfchatError(f"source {src.source!r} gives no {kind} records")
        rows = readers.read_rows(src.path, split=src.split, subset=src.subset, columns=module.COLUMNS)
        for rec in adapter(_counted(rows, read, f"{kind}[{i}] {src.source}"), src, stats):
            n_records += 1
            key, line = _encode(kind, rec)
            if seen is not None:
                if key in seen:
                    stats["duplicate"] += 1
                    continue
                seen.add(key)
            records.append((key, line))
    return records, read[0], n_records


def _encode(kind: str, rec: dict[str, Any]) -> _Record:
    """The record's JSON line and its dedupe key, encoding the record once.

    The key is the sha1 of the line after `"id": ..., "source": ...`, i.e. of the record's body: two records get one
    key exactly when `schema.record_key` gives them one (the adapters build every message as {role, content}).
    A record with a margin takes `record_key` itself, which leaves the margin out.
    """
    line = _ENCODER.encode(rec)
    id, source = rec["id"], rec["source"]
    if "margin" in rec or type(id) is not str or type(source) is not str:
        return record_key(kind, rec), line.encode()
    head = f'{{"id": {_quote(id)}, "source": {_quote(source)}, '
    if not line.startswith(head):
        return record_key(kind, rec), line.encode()
    data = line.encode()
    return hashlib.sha1(memoryview(data)[len(head.encode()):]).hexdigest(), data


def weigh(records: list[Any], weight: float, rng: random.Random, stats: Counter) -> list[Any]:
    """A source's records under its sampling weight: below 1 a sample without repeats, above 1 with them (the copies
    a rerun with the same seed draws again); `stats` counts the records left out. The rounds' feedback uses it too."""
    n = len(records)
    if weight == 1.0 or n == 0:
        return records
    k = round(n * weight)
    if weight < 1.0:
        stats["left out by weight"] += n - k
        return rng.sample(records, k)
    picks = rng.choices(range(n), k=k)
    left_out = n - len(set(picks))
    if left_out:
        stats["left out by weight"] += left_out
    return [records[j] for j in picks]


def _eval_keys(pool: list[_Record], fraction: float) -> set[str]:
    """Keys of the records held out: the first ones of the shuffled pool, all copies of a key on one side."""
    n = len(pool)
    if fraction <= 0 or n < 2:
        return set()
    target = min(n - 1, max(1, round(n * fraction)))
    counts = Counter(key for key, _ in pool)
    keys: set[str] = set()
    taken = 0
    for key, _ in pool:
        if taken >= target:
            break
        if key not in keys and (taken + counts[key] <= target or (taken == 0 and counts[key] <= n - 1)):
            keys.add(key)
            taken += counts[key]
    return keys


def _counted(rows: Iterator, read: list[int], desc: str) -> Iterator:
    """Pass rows through, counting them in read[0] and showing a progress bar on a terminal."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit=" rows", unit_scale=True, disable=None, leave=False) as bar:
        n = 0
        for item in rows:
            n += 1
            if n & 1023 == 0:
                bar.update(1024)
                read[0] = n
            yield item
        bar.update(n & 1023)
        read[0] = n


class _naming:
    """Prefix a RlhfchatError with the recipe entry it comes from: `data.sft[1] (gpt4all): ...`."""

    def __init__(self, kind: str, i: int, src: SourceConfig):
        self.prefix = f"data.{kind}[{i}] ({src.source})"

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if tp is RlhfchatError and not str(e).startswith("data."):
            raise RlhfchatError(f"{self.prefix}: {e}") from None
        return False


def main(recipe: Recipe) -> dict[str, Any]:
    """The data stage (rlhfchat/stage.py): skipped when the data section, the seed and the source files are unchanged;
    returns the card."""
    from rlhfchat import manifest, stage

    if manifest.is_main_process():  # what an interrupted attempt left beside data/: `.data.*.tmp`, `.recipe.yaml.*.tmp`
        sweep(recipe.run_dir, names=("data", "recipe.yaml"))
    sources = [s.path for kind in KINDS for s in getattr(recipe.data, kind)]
    card = stage.run(recipe, "data", inputs=sources, config={"data": recipe.data, "seed": recipe.seed},
                     body=lambda m: build(recipe), result="card.json", main_only=True)
    for kind in KINDS:
        parts = ", ".join(f"{s['source']} {s['kept']}" for s in card[kind]["sources"]) or "no sources"
        print(f"{kind:12s} {card[kind]['train']:>8d} train {card[kind]['eval']:>7d} eval   ({parts})")
    print(f"records in {recipe.run_dir / 'data'}")  # written now, or by the run the stage was skipped for
    return card


if __name__ == "__main__":
    import sys

    from rlhfchat.cli import main as cli_main

    sys.exit(cli_main(["data", *sys.argv[1:]]))
