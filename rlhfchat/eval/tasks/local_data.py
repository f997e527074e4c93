"""lm-eval `custom_dataset` hook: the task's JSONL files, found beside this file (no cache, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata: Any):
    """A `datasets.DatasetDict` of {split: rows of data_files[split]}, paths relative to this folder."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        with open(path, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
