"""Stage 3 under `method: kto`: the SFT model trained on unpaired good and bad replies, with TRL's KTOTrainer.

    rlhfchat kto recipes/tiny-cpu.yaml method=kto [kto.beta=0.1 kto.desirable_weight=1.0 ...]

KTO learns from single replies labelled desirable or undesirable, so it also takes what pairs cannot: a thumb on
one reply. Its examples are

    each preference pair of <run>/data/preferences.{train,eval}.jsonl   chosen -> desirable, rejected -> undesirable
                                                                         (TRL's unpair_preference_dataset)
    <run>/data/unpaired.train.jsonl, when there is one                   one example a line, as `rlhfchat iterate`
                                                                         writes them from thumbs:
        {"id", "source", "prompt": [messages], "completion": "reply text", "label": true | false}   (schema.py)

with exact repeats (the same prompt, reply and label) dropped, shuffled with the recipe's seed (KTO's trainer reads
them in order: its KL term pairs each prompt with its neighbour's reply). Everything else (the reference, the
outputs in `<run>/kto/`, resume and skip, the held-out figures) is the DPO stage's: see train/dpo.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from rlhfchat.config import Recipe
from rlhfchat.train import dpo

UNPAIRED = "unpaired.train.jsonl"
"""Unpaired examples beside the preference files in a run's data folder (written by `rlhfchat iterate`)."""


def _examples(pairs, unpaired: Iterable[dict[str, Any]], seed: int):
    """TRL's conversational unpaired form (prompt, completion as one assistant turn, label): the pairs unpaired,
    then the unpaired records; repeats dropped, shuffled."""
    import datasets
    from trl.data_utils import unpair_preference_dataset

    rows = unpair_preference_dataset(pairs).to_list() if len(pairs) else []
    rows += [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}],
              "label": bool(r["label"])} for r in unpaired]
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps([row["prompt"], row["completion"], row["label"]], sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append({"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]})
    if not kept:
        return datasets.Dataset.from_dict({"prompt": [], "completion": [], "label": []})
    return datasets.Dataset.from_list(kept).shuffle(seed=seed)


def datasets_for(recipe: Recipe, train_file: Path, eval_file: Path):
    from rlhfchat.data.schema import read_jsonl

    train_pairs, eval_pairs = dpo.datasets_for(recipe, train_file, eval_file)
    extra = train_file.parent / UNPAIRED
    thumbs = list(read_jsonl(extra)) if extra.is_file() else []
    return _examples(train_pairs, thumbs, recipe.seed), _examples(eval_pairs, [], recipe.seed)


def trl_args(recipe: Recipe) -> dict[str, Any]:
    """KTOConfig's own arguments from the recipe's `kto` section."""
    cfg = recipe.kto
    return dict(loss_type=cfg.loss_type, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                undesirable_weight=cfg.undesirable_weight, precompute_ref_log_probs=cfg.precompute_ref_log_probs)


def _trl_kto() -> tuple[type, type]:
    from trl import KTOConfig, KTOTrainer

    return KTOConfig, KTOTrainer


def main(recipe: Recipe) -> dict:
    return dpo.run(recipe, "kto", _trl_kto, trl_args, datasets_for,
                   extra_inputs=(recipe.run_dir / "data" / UNPAIRED,))


if __name__ == "__main__":
    import sys

    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
