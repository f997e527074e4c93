"""Stanford Human Preferences (stanfordnlp/SHP): rows {post_id, history, human_ref_A, human_ref_B, labels,
score_ratio, c_root_id_A, c_root_id_B, ...}.

    preferences: prompt = [user: history]; chosen = human_ref_A when labels is 1, else human_ref_B
    prompts:     [user: history]

Pairs whose score_ratio is below `min_score_ratio` (default 2.0, as the SHP authors advise) are skipped
("below min_score_ratio"). Ids are `shp-<post_id>-<c_root_id_A>-<c_root_id_B>` when the row has them, else
`shp-` + 16 hex digits of the sha1 of the row's texts.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable, Iterator

from rlhfchat.config import SourceConfig
from rlhfchat.data.readers import blank, field, text_field
from rlhfchat.data.schema import message, preference, prompt_record
from rlhfchat.errors import RlhfchatError

NAME = "shp"
COLUMNS = ["post_id", "c_root_id_A", "c_root_id_B", "history", "human_ref_A", "human_ref_B", "labels", "score_ratio"]


def _pairs(rows: Iterable[tuple[str, dict[str, Any]]], cfg: SourceConfig, stats: Counter):
    for where, row in rows:
        history = text_field(row, "history", where)
        ref_a = text_field(row, "human_ref_A", where)
        ref_b = text_field(row, "human_ref_B", where)
        label = field(row, "labels", (int, bool), where)
        if label not in (0, 1):
            raise RlhfchatError(f"{where}: field 'labels' must be 0 or 1, got {label!r}")
        ratio = field(row, "score_ratio", (int, float), where)
        if ratio < cfg.min_score_ratio:
            stats["below min_score_ratio"] += 1
            continue
        if blank(history):
            stats["empty history"] += 1
            continue
        if blank(ref_a) or blank(ref_b):
            stats["empty reply"] += 1
            continue
        ids = [row.get(k) for k in ("post_id", "c_root_id_A", "c_root_id_B")]
        if all(isinstance(v, str) and v for v in ids):
            id = f"{NAME}-{'-'.join(ids)}"
        else:
            digest = hashlib.sha1("\x00".join((history, ref_a, ref_b)).encode()).hexdigest()[:16]
            id = f"{NAME}-{digest}"
        chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
        yield id, [message("user", history)], chosen, rejected


def preferences(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, chosen, rejected in _pairs(rows, cfg, stats):
        yield preference(id, NAME, prompt, chosen, rejected)


def prompts(rows, cfg: SourceConfig, stats: Counter) -> Iterator[dict[str, Any]]:
    for id, prompt, _, _ in _pairs(rows, cfg, stats):
        yield prompt_record(id, NAME, prompt)
