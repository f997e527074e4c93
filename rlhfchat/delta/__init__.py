"""Weight deltas: publish a fine-tune as TARGET - BASE when the base's licence forbids sharing it; rebuild TARGET.

    python -m rlhfchat.delta make   --base BASE --target TARGET --out DELTA
    python -m rlhfchat.delta apply  --base BASE --delta DELTA --out TARGET
    python -m rlhfchat.delta verify --target TARGET --delta DELTA

A delta folder is laid out as a Hugging Face model folder whose weights are TARGET - BASE (safetensors shards in
the target's dtypes), plus the target's other files (config, generation config, tokenizer, chat template, PPO's
value_head.safetensors when it holds the head alone; not a run's bookkeeping: manifest.json, metrics), plus:
  README.md                 its model card: what it is, the base it needs, its fingerprints and the exact apply command
  delta.json                the marker and manifest: format, each tensor's shape and dtype, the sha256 of each base
                            tensor (a wrong base is refused before anything is written), of each delta tensor and of
                            each target tensor (the result is verified), how the vocabulary grew, the sha256 of each
                            carried file and of the fixes file.
  delta-fixes.safetensors   the exact target values of the few elements the delta cannot reproduce (see below).

A delta is not a model: every rlhfchat loader of a model folder refuses one (delta.card.refuse, through
models.resolve_model) with the apply command. `--base`, `--delta` and `--target` also take hub ids (hub.download).

Trust. Apply checks, before writing a byte: the base's tensors and every carried file and the fixes file against
their sha256s; shard headers (names, shapes, dtypes, sizes) against the manifest. It copies only the files the
manifest lists, hashes each result tensor and copy as it writes them, and renames the output into place only when
all match (a damaged delta shard is named once its tensor's result differs). Every damage is a one-line error naming
the file, and leaves nothing behind. A delta without delta.json is refused, unless `--legacy` says it is one in the
published StableVicuna layout (below).

Exactness. Apply computes, per element, round_to_target_dtype(float32(base) + float32(delta)). A delta stored in
the target's dtype cannot always make that exact: when |delta| is much larger than |target| (a weight that crossed
zero), the delta's rounding error is larger than the target's last bit. Make runs apply's own arithmetic on every
chunk, compares bit patterns with the target and stores the elements that differ (flat index, target value) in
delta-fixes.safetensors; apply writes them back. So make -> apply is bit for bit for every dtype, and a real
fine-tune costs well under 1% in fixes.

Vocabulary growth: a target tensor with more rows than its base (an added [PAD] token) is the base grown with zero
rows plus the delta, so the new rows are stored whole. The published StableVicuna delta (`.bin` shards, no
manifest) is applied the way its own apply_delta.py does it: base rounded to the delta's dtype, embedding and
output matrices grown with zero rows, delta added; nothing can be checked without a manifest, so it takes `--legacy`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlhfchat.atomic import FILE_MODE, atomic_dir, sweep, write_json
from rlhfchat.delta.card import CARD, FORMAT, MANIFEST, model_card, refuse
from rlhfchat.errors import RlhfchatError
from rlhfchat.manifest import require_complete
from rlhfchat.delta.weights import (
    WORKERS,
    Checkpoint,
    Spec,
    as_bytes,
    dtype_from_name,
    dtype_name,
    file_sha256,
    other_files,
    row_chunks,
    safetensors_header,
    write_shards,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIXES = "delta-fixes.safetensors"
# A run's stage folder holds these beside the model: the stage's bookkeeping, not part of the model, and not
# published (the target's own README.md is replaced by the delta's card)
BOOKKEEPING = ("manifest.json", "metrics.json", "metrics.jsonl", CARD, "trainer_state.json", "all_results.json",
               "train_results.json", "eval_results.json")
DEFAULT_SHARD_SIZE = 500 << 20  # output shard size in bytes; streaming writes make it cost no memory
VALUE_HEAD = "value_head.safetensors"  # PPO's value head: carried as a file when it holds the head alone

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- arithmetic (one chunk at a time) -------------------------------------------------------------------------

def combine(base: torch.Tensor | None, delta: torch.Tensor, dtype: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """TARGET = BASE + DELTA for one chunk: each sum computed in float32 and rounded once to `dtype`.

    `base` None means rows that the base does not have (a grown vocabulary): they are zeros. Adding 0.0 rather
    than copying keeps the reference script's arithmetic (0 + -0.0 = +0.0); make stores a fix where that matters.
    Same-dtype float16/bfloat16 inputs use torch's native add, which converts to float32, adds and rounds once:
    the same bits as the explicit float32 formula (tests check it), at several times its speed.
    `out`, if given, receives the result (shape of `delta`, `dtype`).
    """
    if base is None:
        base = torch.zeros((), dtype=delta.dtype)
    return _arith(torch.add, base, delta, dtype, out)


def subtract(target: torch.Tensor, base: torch.Tensor, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """DELTA = TARGET - BASE for one chunk, computed in float32 and rounded once to `dtype` (as `combine`)."""
    return _arith(torch.sub, target, base, dtype, out)


def _arith(op, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if a.dtype != b.dtype and a.dtype.itemsize < 4 and b.dtype.itemsize < 4:
        a = a.to(torch.float32)  # float16 with bfloat16 would otherwise round to one of them
    if torch.result_type(a, b) == dtype:  # one kernel, straight into `out`
        return op(a, b) if out is None else op(a, b, out=out)
    result = op(a, b).to(dtype)  # mixed dtypes: the float32 result, rounded once
    return result if out is None else out.copy_(result)


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat indices where the bit patterns differ (so -0.0 vs 0.0 and NaN payloads count)."""
    bits = _BITS[a.dtype.itemsize]
    return (a.reshape(-1).view(bits) != b.reshape(-1).view(bits)).nonzero().squeeze(1)


# ---- hub ids --------------------------------------------------------------------------------------------------

def _folder(name: str | Path, what: str, delta: bool = False) -> Path:
    """A local folder for `--base`, `--delta` or `--target`: as given, or a hub id fetched (hub.download). A delta
    given where a model is expected is refused (`delta`: where a delta is expected)."""
    from rlhfchat import hub

    path = Path(name)
    if not path.exists() and hub.is_hub_id(str(name)):
        path = hub.download(str(name), what)
    if not delta and path.is_dir():
        refuse(path, shown_as=str(name))
    return path


# ---- planning: which tensors, which shapes, checked before anything is read in bulk -----------------------------

def _check_shapes(name: str, base: tuple, other: tuple, what: str) -> None:
    """Equal, or `other` has more rows along dim 0 (vocabulary growth); anything else is the wrong base."""
    grown = len(base) == len(other) >= 1 and base[1:] == other[1:] and base[0] < other[0]
    if base != other and not grown:
        raise RlhfchatError(f"shape mismatch for {name}: base {list(base)} vs {what} {list(other)}")


def _entry(e: dict) -> dict:
    """A manifest entry with shapes as tuples and dtypes as torch dtypes."""
    out = dict(e, shape=tuple(e["shape"]), dtype=dtype_from_name(e["dtype"]))
    if e.get("base_shape") is not None:
        out.update(base_shape=tuple(e["base_shape"]), base_dtype=dtype_from_name(e["base_dtype"]))
    return out


def _read_manifest(delta: Path) -> dict | None:
    """The delta's manifest, checked for shape; None when the folder has none."""
    if not delta.is_dir():
        raise RlhfchatError(f"{delta}: no such folder")
    path = delta / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        version = manifest.get("format_version")
    except (OSError, ValueError, AttributeError) as e:
        raise RlhfchatError(f"{path}: not a valid manifest ({e})") from None
    if manifest.get("format") != FORMAT or version != FORMAT_VERSION:
        raise RlhfchatError(f"{path}: format {manifest.get('format')!r} version {version!r}; this rlhfchat reads "
                            f"{FORMAT!r} version {FORMAT_VERSION}")
    try:
        manifest["tensors"] = {k: _entry(v) for k, v in manifest["tensors"].items()}
    except (KeyError, TypeError, AttributeError, RlhfchatError) as e:
        raise RlhfchatError(f"{path}: damaged tensor list ({e})") from None
    files = manifest.get("files", {})
    bad = [n for n in files if not isinstance(n, str) or Path(n).name != n or n.startswith(".")] \
        if isinstance(files, dict) else [files]
    if bad:  # a name with a folder in it would be copied from, and to, outside the folders
        raise RlhfchatError(f"{path}: damaged file list: {bad[0]!r} is not a plain file name")
    return manifest


def _required_manifest(delta: Path) -> dict:
    manifest = _read_manifest(delta)
    if manifest is None:
        raise RlhfchatError(f"{delta} has no {MANIFEST} manifest to verify against")
    return manifest


def _start_output(out: Path) -> None:
    """Remove what an interrupted make or apply to `out` left (`.OUT.*.tmp`), and refuse an existing `out`."""
    sweep(out.parent, names=(out.name,))
    if out.is_symlink() and not out.exists():
        raise RlhfchatError(f"{out} is a symlink to {os.readlink(out)}, which does not exist; remove it or choose "
                            f"another output folder")
    if out.exists():
        raise RlhfchatError(f"{out} already exists; remove it or choose another output folder")


def _check_space(out: Path, need: int) -> None:
    where = out.resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise RlhfchatError(f"not enough disk space for {out}: needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@contextlib.contextmanager
def _disk_errors(out: Path) -> Iterator[None]:
    """A full disk mid-write is a one-line error; atomic_dir has already removed the partial folder."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RlhfchatError(f"disk full while writing {out}; nothing was left behind") from None
        raise


def _rows(shape: tuple) -> int:
    """Length along dim 0; a scalar is one row."""
    return shape[0] if shape else 1


def _main_dtype(specs: list[Spec]) -> str | None:
    """The dtype holding most of the bytes (a model may keep a few tensors in another one)."""
    by = {}
    for s in specs:
        by[s.dtype] = by.get(s.dtype, 0) + s.nbytes
    return dtype_name(max(by, key=by.get)) if by else None


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Elementwise work on a chunk is memory-bound: extra intra-op threads only spin and fight the I/O for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _workers(*checkpoints: Checkpoint) -> int:
    """Threads for write_shards: one when reading `.bin` files (a Checkpoint maps one `.bin` shard at a time)."""
    return 1 if any(c.format == "bin" for c in checkpoints) else WORKERS


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None)


def _carried_files(folder: Path) -> list[Path]:
    """What a delta carries from its target, whole: every file that is not the weights, plus the value head."""
    files = other_files(folder, skip=(MANIFEST, FIXES, *BOOKKEEPING))
    head = folder / VALUE_HEAD
    if head.is_file():
        if all(i.name.startswith("value_head.") for i in safetensors_header(head)):
            files.append(head)
        else:  # the critic's own trunk: base weights, which a delta must not publish whole
            log.warning("%s holds a critic's trunk as well as the value head: the delta leaves it out", head)
    return sorted(files)


def _check_file(path: Path, want: str) -> None:
    if not path.is_file():
        raise RlhfchatError(f"{path} is missing; the delta's manifest lists it")
    got = file_sha256(path)
    if got != want:
        raise RlhfchatError(f"{path} differs from the delta's manifest (sha256 {got[:12]}..., expected "
                            f"{want[:12]}...)")


def _check_files(manifest: dict, delta: Path) -> None:
    """Every file the delta carries, against its sha256 in the manifest; files it does not list are not copied."""
    for name, want in manifest.get("files", {}).items():
        _check_file(delta / name, want)
    for path in _carried_files(delta):
        if path.name not in manifest.get("files", {}):
            log.warning("%s is not in the delta's manifest: not copied", path)


def _open_fixes(manifest: dict, delta: Path):
    """delta-fixes.safetensors, checked against its sha256 and the manifest's counts before anything is written."""
    need = {n: e for n, e in manifest["tensors"].items() if e.get("fixes")}
    path, want = delta / FIXES, manifest.get("fixes_sha256")
    if not need and want is None:
        return None
    if not path.is_file():
        raise RlhfchatError(f"{path} is missing; the delta's manifest counts "
                            f"{sum(e['fixes'] for e in need.values())} fixed elements in it")
    if want is not None:
        _check_file(path, want)
    found = {i.name: i for i in safetensors_header(path)}
    for name, e in need.items():
        idx, val = found.get(f"{name}:index"), found.get(f"{name}:value")
        if (idx is None or val is None or idx.shape != (e["fixes"],) or val.shape != (e["fixes"],)
                or idx.dtype != torch.int64 or val.dtype != e["dtype"]):
            raise RlhfchatError(f"{path} is damaged: the fixes of {name} are missing or not {e['fixes']} int64 "
                                f"indices and {e['fixes']} {dtype_name(e['dtype'])} values")
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _vocab(target: Path, grown: dict[str, tuple[int, int]]) -> dict:
    """How the vocabulary changed: rows before and after, and the tokenizer's added tokens among the new rows."""
    if grown:
        base_rows, target_rows = next(iter(grown.values()))
    else:
        base_rows = target_rows = (_read_json(target / "config.json") or {}).get("vocab_size")
    added = {}
    for tok in (_read_json(target / "tokenizer.json") or {}).get("added_tokens", []):
        added[tok["id"]] = tok["content"]
    for content, idx in (_read_json(target / "added_tokens.json") or {}).items():
        added[idx] = content
    new = [{"id": i, "content": added[i]} for i in sorted(added) if base_rows is not None and i >= base_rows]
    return {"base_rows": base_rows, "target_rows": target_rows, "grown_tensors": sorted(grown), "added_tokens": new}


# ---- make -------------------------------------------------------------------------------------------------------

def make_delta(base: str | Path, target: str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
               base_name: str | None = None, name: str | None = None) -> dict:
    """Write DELTA = TARGET - BASE to `out` (with manifest, fixes, the target's files and a model card); return the
    manifest. `base_name`: what the card calls the base (default: `base` when it is a hub id, else its folder's
    name); `name`: what it calls the delta, e.g. the hub id it will be published under (default: `out`'s name)."""
    from rlhfchat import hub

    base_name = base_name or (str(base) if hub.is_hub_id(str(base)) else Path(base).resolve().name)
    delta_name = name or Path(out).resolve().name
    base, target, out = _folder(base, "--base"), _folder(target, "--target"), Path(out)
    for folder in (base, target):  # a run's stage folder only once its stage has finished
        require_complete(folder)
    _start_output(out)
    with Checkpoint(base) as B, Checkpoint(target) as T:
        # 1. match tensors by name; shapes must agree except for rows added along dim 0
        entries: dict[str, dict] = {}
        for name, ti in T.tensors.items():
            bi = B.tensors.get(name)
            if bi is None:
                raise RlhfchatError(f"target tensor {name} has no counterpart in base {base}: is this the right base?")
            _check_shapes(name, bi.shape, ti.shape, "target")
            entries[name] = {"shape": ti.shape, "dtype": ti.dtype, "base_shape": bi.shape, "base_dtype": bi.dtype,
                             "mode": "add" if ti.dtype.is_floating_point else "copy"}
        grown = {n: (e["base_shape"][0], e["shape"][0]) for n, e in entries.items() if e["shape"] != e["base_shape"]}
        specs = [Spec(n, e["shape"], e["dtype"]) for n, e in entries.items()]
        total = sum(s.nbytes for s in specs)
        _check_space(out, total)

        # 2. stream: each delta chunk is computed, checked against apply's arithmetic and written
        fixes: dict[str, torch.Tensor] = {}

        def produce(spec: Spec, take) -> Iterator[torch.Tensor]:
            name, e = spec.name, entries[spec.name]
            rows, row_elems, base_rows = _rows(spec.shape), math.prod(spec.shape[1:]), _rows(e["base_shape"])
            hb, ht, idx, val = hashlib.sha256(), hashlib.sha256(), [], []
            for r0, r1 in row_chunks(rows, row_elems * spec.dtype.itemsize, split_at=base_rows):
                t = T.rows(name, r0, r1)
                ht.update(as_bytes(t))
                b = B.rows(name, r0, r1) if r0 < base_rows else None  # None: rows the base does not have
                if b is not None:
                    hb.update(as_bytes(b))
                d = take(t.shape, spec.dtype)
                if e["mode"] == "copy" or b is None:
                    d.copy_(t)  # stored whole (a copy, so the mapped pages can go now)
                else:
                    subtract(t, b, spec.dtype, out=d)
                if e["mode"] == "add":
                    bad = _differs(combine(b, d, spec.dtype, out=take(t.shape, spec.dtype)), t)  # what apply computes
                    if bad.numel():
                        idx.append(bad + r0 * row_elems)
                        val.append(t.reshape(-1)[bad])
                T.release(name, r0, r1)
                if b is not None:
                    B.release(name, r0, r1)
                yield d
            e["base_sha256"], e["sha256"], e["fixes"] = hb.hexdigest(), ht.hexdigest(), sum(len(i) for i in idx)
            if idx:
                fixes[f"{name}:index"], fixes[f"{name}:value"] = torch.cat(idx), torch.cat(val)

        with _disk_errors(out), _one_thread(), atomic_dir(out) as tmp, _bar(total, "making delta") as bar:
            delta_hashes = write_shards(tmp, specs, shard_size, produce, bar.update, workers=_workers(B, T))
            fixes_sha256 = None
            if fixes:
                from safetensors.torch import save_file

                save_file(fixes, str(tmp / FIXES))
                os.chmod(tmp / FIXES, FILE_MODE)  # safetensors writes 0600: a delta is for others to read
                fixes_sha256 = file_sha256(tmp / FIXES)
            files = {}
            for path in _carried_files(target):
                shutil.copyfile(path, tmp / path.name)
                files[path.name] = file_sha256(tmp / path.name)
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "name": delta_name, "base_model": base_name,
                "dtype": _main_dtype(specs),
                "vocab": _vocab(target, grown),
                "files": files,
                "fixes_sha256": fixes_sha256,
                "dropped_base_tensors": sorted(set(B.tensors) - set(T.tensors)),
                "tensors": {n: {"shape": list(e["shape"]), "dtype": dtype_name(e["dtype"]),
                                "base_shape": list(e["base_shape"]), "base_dtype": dtype_name(e["base_dtype"]),
                                "base_sha256": e["base_sha256"], "delta_sha256": delta_hashes[n],
                                "sha256": e["sha256"], "mode": e["mode"], "fixes": e["fixes"]}
                            for n, e in entries.items()},
            }
            write_json(tmp / MANIFEST, manifest)
            (tmp / CARD).write_text(model_card(manifest, file_sha256(tmp / MANIFEST), hub.is_hub_id(base_name)),
                                     encoding="utf-8")
    return manifest


# ---- apply ------------------------------------------------------------------------------------------------------

def _legacy_entries(B: Checkpoint, D: Checkpoint) -> dict[str, dict]:
    """A delta without manifest (StableVicuna's): every delta tensor is added to the same-named base tensor."""
    entries = {}
    for name, di in D.tensors.items():
        bi = B.tensors.get(name)
        if bi is None and name.endswith(".rotary_emb.inv_freq"):
            continue  # a buffer 2023's transformers saved and today's recomputes; the script never sees it
        if bi is None:
            raise RlhfchatError(f"base {B.folder} has no tensor {name}, which the delta changes: is it the right base?")
        _check_shapes(name, bi.shape, di.shape, "delta")
        entries[name] = {"shape": di.shape, "dtype": di.dtype, "base_shape": bi.shape, "base_dtype": bi.dtype,
                         "mode": "add" if di.dtype.is_floating_point else "copy", "fixes": 0}
    return entries


def _check_inputs(manifest: dict, B: Checkpoint, D: Checkpoint) -> None:
    """Names, shapes and dtypes of base and delta against the manifest (cheap: headers only)."""
    for name, e in manifest["tensors"].items():
        bi, di = B.tensors.get(name), D.tensors.get(name)
        if bi is None:
            raise RlhfchatError(f"base {B.folder} has no tensor {name}: it is not the base this delta was made from")
        if (bi.shape, bi.dtype) != (e["base_shape"], e["base_dtype"]):
            raise RlhfchatError(f"shape mismatch for {name}: base {list(bi.shape)} {dtype_name(bi.dtype)} vs "
                                f"{list(e['base_shape'])} {dtype_name(e['base_dtype'])} in the delta's manifest")
        if di is None:
            raise RlhfchatError(f"delta {D.folder} is damaged: it has no tensor {name}, which its manifest lists")
        if (di.shape, di.dtype) != (e["shape"], e["dtype"]):
            raise RlhfchatError(f"{di.file} is damaged: tensor {name} is {list(di.shape)} {dtype_name(di.dtype)}, "
                                f"the delta's manifest says {list(e['shape'])} {dtype_name(e['dtype'])}")


def _check_base(manifest: dict, B: Checkpoint) -> None:
    """Hash every base tensor the delta needs, in the base's file order; name the first one that differs."""
    names = [n for n in B.tensors if n in manifest["tensors"]]
    with _bar(sum(B.tensors[n].nbytes for n in names), "checking base") as bar:
        for name, got in B.sha256_all(names, bar.update):
            want = manifest["tensors"][name]["base_sha256"]
            if got != want:
                raise RlhfchatError(f"{B.folder} is not the base this delta was made from: tensor {name} differs "
                                    f"(sha256 {got[:12]}..., expected {want[:12]}...); nothing was written")


def apply_delta(base: str | Path, delta: str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                legacy: bool = False) -> Path:
    """Write TARGET = BASE + DELTA to `out`, streamed chunk by chunk, checked before and verified after.

    `legacy`: the delta has no delta.json (the published StableVicuna layout): applied as its apply_delta.py does,
    with nothing checked. Without it, a delta with no manifest is refused.
    """
    base, delta, out = _folder(base, "--base"), _folder(delta, "--delta", delta=True), Path(out)
    manifest = _read_manifest(delta)
    if manifest is None and not legacy:
        raise RlhfchatError(f"{delta} has no {MANIFEST}, so nothing in it can be checked; if it is a delta in the "
                            f"published StableVicuna layout, pass --legacy to apply it unchecked as its apply_delta.py "
                            f"does")
    if manifest is not None and legacy:
        raise RlhfchatError(f"{delta} has a {MANIFEST}: apply it without --legacy, so that it is checked")
    require_complete(base)
    _start_output(out)
    with Checkpoint(base) as B, Checkpoint(delta) as D:
        # 1. check everything that can be checked before writing a byte
        if manifest is None:
            log.warning("%s: applying it like its own apply_delta.py, without checks (--legacy)", delta)
            entries = _legacy_entries(B, D)
            fixes, files = None, {p.name: None for p in _carried_files(delta)}
        else:
            entries, files = manifest["tensors"], manifest.get("files", {})
            _check_inputs(manifest, B, D)
            _check_files(manifest, delta)
            fixes = _open_fixes(manifest, delta)
            _check_base(manifest, B)
        specs = [Spec(n, e["shape"], e["dtype"]) for n, e in entries.items()]
        total = sum(s.nbytes for s in specs)
        _check_space(out, total)
        fixes_lock = threading.Lock()

        def produce(spec: Spec, take) -> Iterator[torch.Tensor]:
            name, e = spec.name, entries[spec.name]
            rows, row_elems, base_rows = _rows(spec.shape), math.prod(spec.shape[1:]), _rows(e["base_shape"])
            chunks = list(row_chunks(rows, row_elems * spec.dtype.itemsize, split_at=base_rows))
            idx = val = None
            if e.get("fixes"):
                with fixes_lock:  # produce runs in several threads
                    idx, val = fixes.get_tensor(f"{name}:index"), fixes.get_tensor(f"{name}:value")
                starts = [r0 * row_elems for r0, _ in chunks] + [rows * row_elems]
                at = torch.searchsorted(idx, torch.tensor(starts)).tolist()  # chunk k's: idx[at[k]:at[k + 1]]
            for k, (r0, r1) in enumerate(chunks):
                d = D.rows(name, r0, r1)
                t = take(d.shape, spec.dtype)
                if e["mode"] == "copy":
                    t.copy_(d)
                else:
                    b = B.rows(name, r0, r1) if r0 < base_rows else None
                    if manifest is None and b is not None:
                        b = b.to(spec.dtype)  # apply_delta.py loads the base in the delta's dtype before adding
                    combine(b, d, spec.dtype, out=t)
                    if idx is not None and at[k] < at[k + 1]:  # put back what the delta cannot reproduce
                        lo, hi = at[k], at[k + 1]
                        t.reshape(-1)[idx[lo:hi] - r0 * row_elems] = val[lo:hi]
                    if b is not None:
                        B.release(name, r0, r1)
                D.release(name, r0, r1)  # free memory as we go: the mapped input pages leave our RSS
                yield t

        # 2. write into a temporary folder; 3. verify; 4. rename (atomic_dir), or remove it on any error
        with _disk_errors(out), _one_thread(), atomic_dir(out) as tmp, _bar(total, "applying delta") as bar:
            # drop: the model is read next by whatever loads it, in its own time; keeping gigabytes of it cached
            # would push out other files (the base), and recycling a few pages costs less than taking new ones
            hashes = write_shards(tmp, specs, shard_size, produce, bar.update, workers=_workers(B, D), drop=True)
            if manifest is not None:
                for name, e in entries.items():
                    if hashes[name] != e["sha256"]:
                        raise _result_differs(name, e, hashes[name], D)
            for name, want in files.items():
                shutil.copyfile(delta / name, tmp / name)
                if want is not None:
                    _check_file(tmp / name, want)  # what was written, not only what was read
    return out


def _result_differs(name: str, e: dict, got: str, D: Checkpoint) -> RlhfchatError:
    """The error for a result tensor whose sha256 is not the manifest's: the base is checked by now, so the delta's
    tensor or its fixes differ from what make wrote; name the file that does."""
    if e.get("delta_sha256") and D.sha256(name) != e["delta_sha256"]:
        return RlhfchatError(f"{D.tensors[name].file} is damaged: its tensor {name} differs from the delta's "
                             f"manifest; nothing was written")
    return RlhfchatError(f"result tensor {name} does not match the delta's manifest (sha256 {got[:12]}..., "
                         f"expected {e['sha256'][:12]}...); nothing was written")


# ---- verify -----------------------------------------------------------------------------------------------------

def verify_delta(target: str | Path, delta: str | Path) -> None:
    """Check a model folder against a delta's manifest: same tensors, shapes, dtypes, sha256s and files."""
    target, delta = _folder(target, "--target"), _folder(delta, "--delta", delta=True)
    manifest = _required_manifest(delta)
    tensors = manifest["tensors"]
    with Checkpoint(target) as T:
        extra = sorted(set(T.tensors) - set(tensors))
        if extra:
            raise RlhfchatError(f"{target} has tensor {extra[0]}, which the delta's manifest does not list")
        missing = [n for n in tensors if n not in T.tensors]
        if missing:
            raise RlhfchatError(f"{target} has no tensor {missing[0]}, which the delta's manifest lists")
        with _bar(sum(T.tensors[n].nbytes for n in tensors), "verifying") as bar:
            for name, ti in T.tensors.items():
                e = tensors[name]
                if (ti.shape, ti.dtype) != (e["shape"], e["dtype"]):
                    raise RlhfchatError(f"tensor {name} in {target} is {list(ti.shape)} {dtype_name(ti.dtype)}, the "
                                        f"manifest says {list(e['shape'])} {dtype_name(e['dtype'])}")
            for name, got in T.sha256_all(list(T.tensors), bar.update):
                e = tensors[name]
                if got != e["sha256"]:
                    raise RlhfchatError(f"tensor {name} in {target} differs from the delta's manifest "
                                        f"(sha256 {got[:12]}..., expected {e['sha256'][:12]}...)")
    for fname, want in manifest.get("files", {}).items():
        path = target / fname
        if not path.is_file() or file_sha256(path) != want:
            raise RlhfchatError(f"{path} is missing or differs from the delta's manifest")
