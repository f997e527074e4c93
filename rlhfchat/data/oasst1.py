"""OpenAssistant Conversations (OpenAssistant/oasst1, oasst2): flat message rows rebuilt into trees.

A row is one message: {message_id, parent_id (null for a tree's root), role: prompter|assistant, text, lang, rank,
deleted, review_result, created_date, message_tree_id, ...}. The trees are rebuilt from parent_id, then:

- a deleted message, one that failed review (review_result false) or one with empty text is dropped with its whole
  subtree; a message whose parent is not in the data is dropped too ("parent missing"; an error under strict);
- `langs: [en, ...]` keeps only trees whose root message is in one of those languages.

    sft:         one conversation per kept tree, following the best reply at every turn (lowest rank; replies
                 without a rank come after ranked ones, earliest created_date first) and ending on an assistant turn
    preferences: for every prompter message with two or more kept, ranked assistant replies, pairs of replies
                 (`pairs`: best_vs_rest, all or best_vs_worst); the prompt is the conversation up to that message
    prompts:     the root message of every kept tree

Ids: `oasst1-<root message_id>` for conversations and prompts, `oasst1-<chosen id>-<rejected id>` for pairs.
The whole file is read before the first record (a tree's messages may be anywhere in it); only the fields used are
kept in memory.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import blank, field, text_field
from rlhfchat.data.schema import conversation, message, preference, prompt_record
from rlhfchat.errors import RlhfchatError

NAME = "oasst1"
COLUMNS = ["message_id", "parent_id", "role", "text", "lang", "rank", "deleted", "review_result", "created_date"]
_ROLES = {"prompter": "user", "assistant": "assistant"}


class _Msg:
    __slots__ = ("id", "parent", "role", "text", "lang", "rank", "created", "order", "where", "drop", "children")

    def __init__(self, id, parent, role, text, lang, rank, created, order, where, drop):
        self.id, self.parent, self.role, self.text, self.lang = id, parent, role, text, lang
        self.rank, self.created, self.order, self.where, self.drop = rank, created, order, where, drop
        self.children: list[_Msg] = []

    def best_first(self) -> tuple:
        return (self.rank is None, self.rank or 0, self.created, self.order)

    def as_message(self) -> dict[str, str]:
        return message(_ROLES[self.role], self.text)


def _read(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[_Msg]:
    msgs: list[_Msg] = []
    for order, (where, row) in enumerate(rows):
        id = text_field(row, "message_id", where)
        if "parent_id" not in row:
            raise RlhfchatError(f"{where}: missing field 'parent_id'")
        parent = field(row, "parent_id", str, where, optional=True)
        role = text_field(row, "role", where)
        if role not in _ROLES:
            raise RlhfchatError(f"{where}: field 'role' must be 'prompter' or 'assistant', got {role!r}")
        text = text_field(row, "text", where)
        lang = field(row, "lang", str, where, optional=True)
        rank = field(row, "rank", (int, float), where, optional=True)
        if rank is not None and math.isnan(rank):
            rank = None
        created = row.get("created_date")
        created = "" if created is None else str(created)
        drop = ""
        if field(row, "deleted", bool, where, optional=True, default=False):
            drop = "deleted"
        elif field(row, "review_result", bool, where, optional=True, default=True) is False:
            drop = "failed review"
        elif blank(text):
            drop = "empty text"
        msgs.append(_Msg(id, parent or None, role, text, lang, rank, created, order, where, drop))
    return msgs


def _kept_trees(rows, cfg: SourceConfig, stats: Counter) -> Iterator[_Msg]:
    """Roots of the kept trees, in file order, each node's `children` the kept replies in best-first order."""
    msgs = _read(rows)
    by_id: dict[str, _Msg] = {}
    for m in msgs:
        if m.id in by_id:
            raise RlhfchatError(f"{m.where}: field 'message_id': duplicate id {m.id!r}")
        by_id[m.id] = m
    roots = []
    for m in msgs:
        if m.parent is None:
            roots.append(m)
        elif m.parent in by_id:
            by_id[m.parent].children.append(m)
    langs = set(cfg.langs) if cfg.langs else None
    reached = 0
    for root in roots:
        if not root.drop and root.role != "prompter":
            root.drop = "tree root is not a prompter message"
        if not root.drop and langs is not None and root.lang not in langs:
            root.drop = "lang not in langs"
        stack, keep_tree = [root], not root.drop
        while stack:  # walk the whole tree: count what is dropped, prune dropped subtrees, order replies best first
            node = stack.pop()
            reached += 1
            if node.drop:
                stats[node.drop] += 1
                below = _count_below(node)
                if below:
                    reached += below
                    stats["in a dropped subtree"] += below
                continue
            node.children.sort(key=_Msg.best_first)
            stack.extend(node.children)  # dropped children are counted when popped
            node.children = [c for c in node.children if not c.drop]
        if keep_tree:
            yield root
    if reached < len(msgs):
        if cfg.strict:
            first = next((m for m in msgs if m.parent is not None and m.parent not in by_id), None)
            if first is None:
                raise RlhfchatError(f"{msgs[0].where}: field 'parent_id': messages form a cycle (strict: true)")
            raise RlhfchatError(f"{first.where}: field 'parent_id': parent {first.parent!r} not found (strict: true)")
        stats["parent missing"] += len(msgs) - reached


def _count_below(node: _Msg) -> int:
    n, stack = 0, list(node.children)
    while stack:
        m = stack.pop()
        n += 1
        stack.extend(m.children)
    return n


def sft(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for root in _kept_trees(rows, cfg, stats):
        path, node = [root], root
        while node.children:
            node = node.children[0]
            path.append(node)
        while path and path[-1].role != "assistant":
            path.pop()
        if not path:
            stats["tree without a reply"] += 1
            continue
        yield conversation(f"{NAME}-{root.id}", NAME, [m.as_message() for m in path])


def preferences(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for root in _kept_trees(rows, cfg, stats):
        stack: list[tuple[_Msg, list[dict[str, str]]]] = [(root, [root.as_message()])]
        while stack:
            node, convo = stack.pop()
            if node.role == "prompter":
                ranked = [c for c in node.children if c.role == "assistant" and c.rank is not None]
                for chosen, rejected in _pairs(ranked, cfg.pairs):
                    yield preference(f"{NAME}-{chosen.id}-{rejected.id}", NAME, convo, chosen.text, rejected.text)
            for child in reversed(node.children):  # reversed: pop visits the best reply first
                stack.append((child, convo + [child.as_message()]))


def _pairs(ranked: list[_Msg], how: str) -> list[tuple[_Msg, _Msg]]:
    """(chosen, rejected) pairs of replies sorted best first; replies of equal rank make no pair."""
    if len(ranked) < 2:
        return []
    if how == "best_vs_rest":
        pairs = [(ranked[0], r) for r in ranked[1:]]
    elif how == "best_vs_worst":
        pairs = [(ranked[0], ranked[-1])]
    else:
        pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    return [(a, b) for a, b in pairs if a.rank < b.rank]


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for root in _kept_trees(rows, cfg, stats):
        yield prompt_record(f"{NAME}-{root.id}", NAME, [root.as_message()])
