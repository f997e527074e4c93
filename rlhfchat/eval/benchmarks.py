"""Benchmarks through lm-eval's Python API: the local skill tasks offline, any task lm-eval knows when online.

    scores = run_tasks("runs/tiny-cpu/ppo", ["rlhfchat_math", "hellaswag"], limit=20)
    # {"rlhfchat_math": {"metric": "exact_match", "filter": "last-integer", "score": 0.4, "stderr": 0.07,
    #                    "n": 20, "metrics": {"exact_match,last-integer": 0.4, ...}},
    #  "hellaswag": {"error": "..."}}                                  (offline: the dataset could not be fetched)

The local tasks (`rlhfchat/eval/tasks/`, lm-eval's own YAML format) are chat-style questions and run with the
model's chat template applied. Every other name goes to lm-eval's registry and runs as lm-eval runs it by default
(no chat template, the task's own few-shot setting), which is how the leaderboard numbers StableVicuna was compared
on (MMLU, HellaSwag, ARC, Winogrande, BoolQ, PIQA, TruthfulQA, GSM8K) are taken. Each such task runs on its own, so
one that cannot fetch its dataset records an error instead of sinking the others.
"""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlhfchat.errors import RlhfchatError
from rlhfchat.eval.tasks import LOCAL_TASKS, TASKS_DIR

LOCAL_NAMES = (*LOCAL_TASKS, "rlhfchat")  # the three tasks and their tag

STANDARD_TASKS = ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "piqa",
                  "truthfulqa_mc2", "gsm8k"]
"""lm-eval's names for the benchmarks StableVicuna was published with (for recipes; they need the network once)."""

_PRIMARY = ("exact_match", "acc_norm", "acc", "mc2", "f1", "em", "bleu", "word_perplexity")


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every task's setup at WARNING; keep the progress bars and real errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(tasks: Sequence[str]):
    """An lm-eval TaskManager that knows our local tasks, and lm-eval's own only when `tasks` needs them.

    Indexing lm-eval's 14k bundled task configs takes seconds, so the local-only case skips it.
    """
    from lm_eval.tasks import TaskManager

    needs_defaults = any(t not in LOCAL_NAMES for t in tasks)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_defaults)


def check_tasks(tasks: Sequence[str], manager: Any = None) -> None:
    """Raise RlhfchatError naming any task lm-eval does not know, with the closest known names."""
    manager = manager or task_manager(tasks)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RlhfchatError(f"eval.tasks: lm-eval has no task named {name!r}{hint}")


def _summarize(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """One task's (or group's) figures from lm-eval's output: headline metric, its stderr, sample count."""
    row = results.get("groups", {}).get(name) or results["results"].get(name, {})
    metrics = {}
    for key, value in row.items():
        if key in ("alias", "name", "sample_len", " ") or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metrics[key.removesuffix(",none")] = float(value)
    primary = next((k for p in _PRIMARY for k in metrics if k.split(",")[0] == p), next(iter(metrics), None))
    out: dict[str, Any] = {"metric": None, "filter": None, "score": None, "stderr": None, "metrics": metrics}
    if primary is not None:
        metric, _, filt = primary.partition(",")
        stderr = row.get(f"{metric}_stderr,{filt or 'none'}")
        out.update(metric=metric, filter=filt or None, score=metrics[primary],
                   stderr=float(stderr) if isinstance(stderr, (int, float)) else None)
    leaves = _leaves(name, results.get("group_subtasks", {}))
    out["n"] = sum(int(results.get("n-samples", {}).get(t, {}).get("effective", 0)) for t in leaves)
    return out


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(child, group_subtasks)]


def run_tasks(model: Any, tasks: Sequence[str], *, tokenizer: Any = None, limit: int | float | None = None,
              batch_size: int | str = 16, device: str | None = None, dtype: str = "float32", seed: int = 0,
              bootstrap: int = 1000, manager: Any = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval tasks on one model; returns {task: summary} (see the module docstring), in the order given.

    `model` is a model folder, a hub id or a loaded `PreTrainedModel` (then pass its `tokenizer`); `limit` caps the
    items per task (an int, or a fraction below 1). The tag `rlhfchat` expands to the three local tasks.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from rlhfchat.models import load_tokenizer

    tasks = [t for name in tasks for t in (LOCAL_TASKS if name == "rlhfchat" else [name])]
    if not tasks:
        return {}
    manager = manager or task_manager(tasks)
    check_tasks(tasks, manager)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        tokenizer = load_tokenizer(model)  # our template where the folder has none
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model if not isinstance(model, Path) else str(model), tokenizer=tokenizer,
                  batch_size=batch_size, device=device, dtype=dtype, max_batch_size=64)

    def evaluate(names: list[str], chat: bool) -> dict[str, Any]:
        with _quiet_lm_eval():
            return lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, apply_chat_template=chat,
                bootstrap_iters=bootstrap, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)

    out: dict[str, dict[str, Any]] = {}
    local = [t for t in tasks if t in LOCAL_TASKS]
    if local:
        results = evaluate(local, chat=True)
        out.update({t: _summarize(t, results) for t in local})
    for name in (t for t in tasks if t not in LOCAL_TASKS):
        try:
            out[name] = _summarize(name, evaluate([name], chat=False))
        except Exception as e:  # most often: offline and the dataset is not in the local cache
            first = (str(e).strip().splitlines() or [""])[0][:300]
            out[name] = {"error": f"{type(e).__name__}: {first}"}
            print(f"[eval] task {name} failed: {out[name]['error']}")
    return {t: out[t] for t in tasks}
