"""Typed dataclasses from plain dicts: every key and value checked, one line naming the key when one is wrong; dotted
`key=value` overrides; and each field's documentation (the string under it in the source) for `--help`.

    recipe = from_dict(Recipe, {"seed": 1, "ppo": {"target": None}})
    _set_dotted(raw, Recipe, "ppo.generation.top_k", 50)
    for line in describe(PPOConfig, "ppo."): print(line)
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

import yaml

from rlhfchat.errors import RlhfchatError


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts to dataclasses, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RlhfchatError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RlhfchatError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RlhfchatError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RlhfchatError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RlhfchatError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RlhfchatError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RlhfchatError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RlhfchatError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise RlhfchatError(f"{prefix}{key}: unknown key; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RlhfchatError(f"{prefix}{missing[0]}: required key is missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Set `a.b.c=value` in the raw dict, checking each part names a field of the dataclass it walks through."""
    parts = dotted.split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        key = ".".join(parts[: depth + 1])
        hints = typing.get_type_hints(node_cls)
        if part not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(node_cls))
            raise RlhfchatError(f"{key}: unknown key; valid keys: {valid}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            raise RlhfchatError(f"{key}: is a {_type_name(tp)}, it has no sub-keys")
        child = node.get(part)
        if child is None:
            child = {}
        elif dataclasses.is_dataclass(child):
            child = to_dict(child)
        node[part] = child
        node, node_cls = child, tp


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RlhfchatError(f"override {text!r}: expected key=value (e.g. ppo.init_kl_coef=0.05)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise RlhfchatError(f"override {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return key.strip(), value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a dataclass and its bases: the string literal right under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:] + [None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return to_dict(value) if dataclasses.is_dataclass(value) else value
    return "(required)"


def _nested(tp: Any) -> type | None:
    """The dataclass a field holds (directly or as `X | None`), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def describe(cls: type, prefix: str = "", width: int = 100, expand: bool = True) -> list[str]:
    """Every field of `cls` as `key: type = default` and its docstring, for --help; nested dataclasses (and lists of
    them) field by field, or with `expand=False` one line each."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        nested = _nested(hints[f.name])
        key = f"{prefix}{f.name}"
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(item):  # a list of records: its entries' fields
            lines.append(f"{key}: list of {_type_name(item)}{': ' + docs[f.name] if f.name in docs else ''}")
            if expand:
                lines.extend(describe(item, f"{key}[i].", width))
            continue
        if nested is not None:
            lines.append(f"{key}.*  ({_type_name(nested)}){': ' + docs[f.name].splitlines()[0] if f.name in docs else ''}")
            if expand:
                lines.extend(describe(nested, f"{key}.", width))
            continue
        default = yaml.safe_dump(_default(f), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{key}: {_type_name(hints[f.name])} = {default}")
        for para in (docs.get(f.name) or "").split("\n\n"):  # the source's line breaks are not the text's
            lines.extend(textwrap.wrap(" ".join(para.split()), width, initial_indent="    ", subsequent_indent="    "))
    return lines
