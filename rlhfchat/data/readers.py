"""Rows of a published dataset, from a local file or folder or a hub id, one `(where, row)` at a time.

    for where, row in read_rows("data/oasst1.parquet", columns=["message_id", "text"]):
        ...   # where == "data/oasst1.parquet row 1", row == {"message_id": ..., "text": ...}

Local formats: `.parquet` (read by pyarrow in record batches), `.jsonl`, `.jsonl.gz`, `.json` (JSON lines or one JSON
array), `.json.gz`, or a folder of such files searched recursively in sorted order. When some files in a folder
name a split (`train-00000-of-00001.parquet`, `helpful-base/test.jsonl.gz`, `data/validation/...`), only those of
`split` are read, so a clone of a hub repository can be given as is. A path that is not local is read through
`datasets.load_dataset` (needs the network, or the hub cache). `where` counts lines and rows from 1.

A split may be sliced as in `datasets` (`train[:50%]`, `train[50%:]`, `train[100:200]`, `test[-10:]`): local rows
are cut the same way (a percentage of the split's rows rounded to the closest row, as `datasets` does), so one
published split can feed two kinds of record without sharing a row (SFT on the first half, RL prompts from the
second). `where` keeps each row's number in its file.

The row helpers at the bottom (`text_field`, `field`) check a field's presence and type and raise a one-line
`RlhfchatError` naming `where` and the field.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from rlhfchat.errors import RlhfchatError

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
_SPLIT = re.compile(r"^(train|test|validation|valid|dev|eval)(?=$|[-_.])")
_BATCH_ROWS = 4096


def read_rows(path: str, *, split: str = "train", subset: str | None = None, columns: list[str] | None = None,
              source: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, row)` for every row of `path` (file, folder or hub id); `columns` limits what is read.
    `split` may carry a slice (`train[:50%]`: see the module's docstring)."""
    cut = split_slice(split, source)[1]
    files = local_files(path, split, subset)
    if files is None:
        yield from _read_hub(path, split, subset, columns, source)
        return
    rows = (row for file in files for row in read_file(file, columns))
    if cut is None:
        yield from rows
        return
    rows = list(rows)
    yield from rows[cut(len(rows))]


_SLICE = re.compile(r"^([\w.-]+)\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\]$")


def split_slice(split: str, source: str = "") -> tuple[str, Any]:
    """`train[10%:50%]` -> ("train", a function of the split's row count giving the python slice of its rows);
    a plain split name -> (the name, None). As in `datasets`: a bound with % makes both bounds percentages, which
    round to the closest row."""
    if "[" not in split:
        return split, None
    where = f"{source}: " if source else ""
    m = _SLICE.match(split.strip())
    if m is None:
        raise RlhfchatError(f"{where}split {split!r}: expected a split name or a slice of one such as 'train[:50%]', "
                            "'train[50%:]' or 'train[100:200]'")
    name, *texts = m.groups()
    bounds = [None if t is None else int(t.rstrip("%")) for t in texts]
    if not any(t is not None and t.endswith("%") for t in texts):  # one bound with % makes both percentages
        return name, lambda n: slice(*bounds)
    if any(b is not None and not -100 <= b <= 100 for b in bounds):
        raise RlhfchatError(f"{where}split {split!r}: a percentage must be in [-100%, 100%]")
    return name, lambda n: slice(*(None if b is None else int(round(b * n / 100)) for b in bounds))


def local_files(path: str, split: str = "train", subset: str | None = None) -> list[Path] | None:
    """The local data files `path` names, or None when it is a hub id; a missing local path is an error.

    A local folder with a subfolder named `subset` (a clone of a hub repository with several configurations, such
    as openai/gsm8k's main/ and socratic/) is read from that subfolder. A sliced split (`train[:50%]`) names the
    files of its split; read_rows cuts their rows.
    """
    split = split_slice(split)[0]
    local = Path(path).expanduser()
    if local.exists():
        if subset and local.is_dir() and (local / subset).is_dir():
            local = local / subset
        return data_files(local, split)
    if _looks_local(path):
        raise RlhfchatError(f"{path}: file not found")
    return None


def data_files(path: Path, split: str = "train") -> list[Path]:
    """The data files of a file or folder: the file itself, or the folder's files of `split` in sorted order."""
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise RlhfchatError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise RlhfchatError(f"{path}: folder has no data files ({', '.join(SUFFIXES)})")
    splits = {f: _split_of(f.relative_to(path)) for f in files}
    if any(splits.values()):
        chosen = [f for f in files if splits[f] == split]
        if not chosen:
            found = ", ".join(sorted({s for s in splits.values() if s}))
            raise RlhfchatError(f"{path}: no files of split {split!r} in the folder (splits found: {found})")
        files = chosen
    return files


def _split_of(rel: Path) -> str | None:
    for part in rel.parts:
        m = _SPLIT.match(part)
        if m:
            return m.group(1)
    return None


def _looks_local(path: str) -> bool:
    """A path that cannot be a hub id (`owner/name` or `name`): absolute, relative with ./ or ../, ~, a data file."""
    return (path.startswith(("/", ".", "~")) or path.endswith(SUFFIXES) or path.count("/") > 1
            or "\\" in path)


def read_file(file: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, row)` for one local data file."""
    if file.name.endswith(".parquet"):
        yield from _read_parquet(file, columns)
        return
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            head = f.read(4096).lstrip()
            if head.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                head = head[3:].lstrip()
        if head.startswith(b"["):
            yield from _read_json_array(file, opener)
        else:
            yield from _read_json_lines(file, opener)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise RlhfchatError(f"{file}: cannot read ({e})") from None


def _read_json_lines(file: Path, opener) -> Iterator[tuple[str, dict[str, Any]]]:
    name = str(file)
    with opener(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.strip():  # a blank line
                    continue
                raise RlhfchatError(f"{name} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # undecodable bytes
                raise RlhfchatError(f"{name} line {lineno}: invalid JSON ({e})") from None
            where = f"{name} line {lineno}"
            if not isinstance(row, dict):
                raise RlhfchatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_json_array(file: Path, opener) -> Iterator[tuple[str, dict[str, Any]]]:
    with opener(file, "rb") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise RlhfchatError(f"{file} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise RlhfchatError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(rows, list):
        raise RlhfchatError(f"{file}: expected a JSON array of objects or JSON lines")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise RlhfchatError(f"{file} row {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{file} row {i}", row


def _read_parquet(file: Path, columns: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise RlhfchatError(f"{file}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    cols = None if columns is None else [c for c in columns if c in names]
    n, name = 0, str(file)
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
            for row in batch.to_pylist():
                n += 1
                yield f"{name} row {n}", row
    except (pa.ArrowException, OSError) as e:
        raise RlhfchatError(f"{file} row {n + 1}: cannot read ({e})") from None


def _read_hub(path: str, split: str, subset: str | None, columns: list[str] | None,
              source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise RlhfchatError(f"{source}: {path!r} is not a local file and `datasets` is not installed") from None
    import datasets.config

    name = f"{source}: " if source else ""
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise RlhfchatError(f"{name}{path!r} is neither a local file nor reachable on the hub (no connection; "
                            "set HF_HUB_OFFLINE=1 to read a dataset already in the hub cache)")
    # A subset is a configuration name for most repositories and a folder (data_dir) for some (Anthropic/hh-rlhf).
    attempts = [{"name": subset}] + ([{"data_dir": subset}] if subset else [])
    error: Exception | None = None
    ds = None
    for kwargs in attempts:
        try:
            ds = datasets.load_dataset(path, split=split, **kwargs)
            break
        except Exception as e:  # offline, unknown repo, unknown config: all end as one line below
            error = e
    if ds is None:
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise RlhfchatError(f"{name}{path!r} is neither a local file nor reachable on the hub ({reason[:200]})")
    if columns is not None:
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
    for i, row in enumerate(ds, 1):
        yield f"{path} ({split}) row {i}", row


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that a machine without network fails at once instead of after retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let the hub library try
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Row fields, checked


_MISSING = object()


def field(row: dict[str, Any], name: str, types: type | tuple[type, ...], where: str, *, optional: bool = False,
          default: Any = None) -> Any:
    """`row[name]` checked against `types`; a missing field (or None, when optional) gives `default`."""
    value = row.get(name, _MISSING)
    if type(value) is types:  # the common case, checked first
        return value
    if value is _MISSING or (value is None and optional):
        if optional:
            return default
        raise RlhfchatError(f"{where}: missing field {name!r}")
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        expected = " or ".join(t.__name__ for t in _as_tuple(types))
        raise RlhfchatError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {_short(value)}")
    return value


def text_field(row: dict[str, Any], name: str, where: str, *, optional: bool = False) -> str:
    """A string field; an optional one that is missing or null reads as ""."""
    value = row.get(name)
    if type(value) is str:
        return value
    return field(row, name, str, where, optional=optional, default="")


def blank(text: str) -> bool:
    """Empty or only whitespace (without copying the text, as `not text.strip()` would)."""
    return not text or text.isspace()


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Chat messages in a row: HF / TRL conversational ({role, content}) or ShareGPT ({from, value})

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
"""ShareGPT's `from` values (and the roles of HF chat data) -> canonical roles; any other (tool, function_call,
observation) makes the row unsupported."""


class UnsupportedRow(Exception):
    """A well-formed row the canonical records cannot hold (an adapter counts it, or raises with `strict`)."""


def messages_field(row: dict[str, Any], name: str, where: str) -> list[dict[str, str]]:
    """`row[name]` as canonical messages: a list of {role, content} (HF, TRL, OpenAI; extra keys ignored) or of
    ShareGPT's {from, value}. Content may be a string or a list of parts of which the text ones are joined.
    A malformed list is a RlhfchatError naming the message; a role outside SHAREGPT_ROLES is UnsupportedRow."""
    value = field(row, name, list, where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RlhfchatError(f"{where}: {name}[{i}] must be an object with role and content, got "
                                f"{type(m).__name__}")
        role_key, text_key = ("role", "content") if "role" in m or "content" in m else ("from", "value")
        role, content = m.get(role_key), m.get(text_key)
        if not isinstance(role, str):
            raise RlhfchatError(f"{where}: {name}[{i}] has no {role_key!r} string (expected {{role, content}} or "
                                "ShareGPT's {from, value})")
        if isinstance(content, list):  # OpenAI-style content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RlhfchatError(f"{where}: {name}[{i}].{text_key} must be a string, got {type(content).__name__}")
        canonical = SHAREGPT_ROLES.get(role.lower())
        if canonical is None:
            raise UnsupportedRow(f"role {role!r}")
        out.append({"role": canonical, "content": content})
    return out


def drop(cfg: Any, stats: Any, where: str, reason: str) -> None:
    """A row an adapter skips: counted under `reason`, or with `strict: true` an error naming the row."""
    if getattr(cfg, "strict", False):
        raise RlhfchatError(f"{where}: {reason} (strict: true)")
    stats[reason] += 1
