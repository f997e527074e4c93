"""What marks a folder as a weight delta, the one line every model loader gives for one, and the delta's model card.

A delta folder is marked by its delta.json (MANIFEST) saying `"format": "rlhfchat-delta"`: `is_delta`, `refuse`.

The model card (README.md) says what it is, the base it needs, its fingerprints and the exact apply command.

Written by `rlhfchat delta make` from the delta's manifest alone, so it says only what apply checks. The front
matter is the Hugging Face Hub's model card metadata: `base_model` (when the base is a hub id) links the delta to its
base on the hub; the tags say it is a delta, not a model.

A fingerprint stands for a whole checkpoint in one hash: the sha256 of the lines "<tensor name> <sha256 of its
bytes>\\n", sorted by name, over the tensors the delta covers. The base's fingerprint is what apply checks the given
base against (tensor by tensor), the result's what it checks the model it writes against.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from rlhfchat.errors import RlhfchatError

FORMAT = "rlhfchat-delta"
MANIFEST = "delta.json"
CARD = "README.md"


def is_delta(folder: str | Path) -> dict | None:
    """The raw manifest when `folder` holds an rlhfchat delta (its delta.json says so), else None. Cheap: no hashing.

    A delta.json that does not parse counts as a delta's ({}): a damaged delta is still not a model."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def applied_name(delta: str) -> str:
    """A name for the model a delta rebuilds: `x-delta` -> `x`, anything else -> `x-applied`."""
    name = Path(str(delta).rstrip("/")).name or "model"
    return name.removesuffix("-delta") if name.endswith("-delta") and name != "-delta" else f"{name}-applied"


def is_a_delta(name: str | Path, manifest: dict | None = None) -> RlhfchatError:
    """The one line every loader of a model folder gives for a delta."""
    base = (manifest or {}).get("base_model") or "BASE"
    return RlhfchatError(f"{name}: this is a weight delta: apply it with `rlhfchat delta apply --base {base} "
                         f"--delta {name} --out {applied_name(str(name))}`")


def refuse(folder: str | Path, shown_as: str | None = None) -> None:
    """Refuse a delta folder where a model folder is expected (one line with the apply command)."""
    manifest = is_delta(folder)
    if manifest is not None:
        raise is_a_delta(shown_as or folder, manifest)


def fingerprint(tensors: dict[str, dict[str, Any]], key: str) -> str:
    """sha256 over "name sha256" lines sorted by name; `key`: "base_sha256" (the base) or "sha256" (the result)."""
    lines = "".join(f"{name} {entry[key]}\n" for name, entry in sorted(tensors.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(int(n))


def model_card(manifest: dict[str, Any], manifest_sha256: str, base_on_hub: bool = False) -> str:
    """The README.md of a delta folder, from its manifest (as make_delta writes it) and delta.json's sha256;
    `base_on_hub`: the base is a hub id (the card's front matter then names it as its base_model)."""

    name, base = manifest.get("name") or "DELTA", manifest.get("base_model") or "BASE"
    tensors = manifest["tensors"]
    out = applied_name(name)
    params = sum(math.prod(e["base_shape"]) for e in tensors.values())
    vocab = manifest.get("vocab") or {}
    added = vocab.get("added_tokens") or []
    grown = (f"; the delta adds {vocab['target_rows'] - vocab['base_rows']} rows"
             + (f" ({', '.join('`' + t['content'] + '`' for t in added)})" if added else "")
             if vocab.get("grown_tensors") else "")
    front = ["---", "tags:", "- rlhfchat", "- weight-delta"]
    if base_on_hub and "/" in base:
        front += [f"base_model: {base}"]
    front += ["---", ""]
    files = manifest.get("files") or {}
    fixes = sum(int(e.get("fixes") or 0) for e in tensors.values())
    md = [
        *front,
        f"# {name}: a weight delta against {base}",
        "",
        ("This folder is **not a model**. Its weights are the difference TARGET − BASE between a fine-tuned model and "
         f"the base model `{base}` it was trained from, published this way when the base's licence does not allow "
         "sharing the base's weights. Loaded as a model it gives nonsense (rlhfchat refuses to load it). Rebuild the "
         "model from a copy of the base with rlhfchat:"),
        "",
        "```bash",
        f"rlhfchat delta apply --base {base} --delta {name} --out {out}",
        "```",
        "",
        ("`--base` takes the base's folder or hub id, `--delta` this folder or its hub id. Before writing anything, "
         "apply checks every base tensor against its sha256 here (a different base is refused, naming the first "
         "tensor that differs) and every file of this folder; it checks each tensor it writes against the result's "
         f"sha256 and leaves nothing behind on any error. Later, `rlhfchat delta verify --target {out} --delta "
         f"{name}` checks the model again."),
        "",
        "## The base it needs",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{base}` |",
        f"| tensors | {len(tensors)} ({_count(params)} parameters), mostly {manifest.get('dtype') or '?'} |",
    ]
    if vocab.get("base_rows") is not None:
        md.append(f"| vocabulary | {vocab['base_rows']} rows{grown} |")
    md += [
        f"| fingerprint | `{fingerprint(tensors, 'base_sha256')}` |",
        "",
        "## Hashes",
        "",
        ("A fingerprint is the sha256 of the lines `<tensor name> <sha256 of its bytes>`, sorted by name; `delta.json` "
         "holds every base, delta and result tensor's sha256 and every file's."),
        "",
        "| | sha256 |",
        "|---|---|",
        f"| base (fingerprint) | `{fingerprint(tensors, 'base_sha256')}` |",
        f"| result (fingerprint) | `{fingerprint(tensors, 'sha256')}` |",
        f"| `delta.json` | `{manifest_sha256}` |",
    ]
    if manifest.get("fixes_sha256"):
        md.append(f"| `delta-fixes.safetensors` ({fixes} elements stored exactly) | `{manifest['fixes_sha256']}` |")
    md += [f"| `{fname}` | `{sha}` |" for fname, sha in sorted(files.items())]
    md += ["", "Made by `rlhfchat delta make`. The delta is stored in the result's dtypes; apply rebuilds the result "
           "bit for bit.", ""]
    return "\n".join(md)
