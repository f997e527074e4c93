"""lm-eval task definitions for the sample data's three skills, runnable offline.

    lm_eval --model hf --model_args pretrained=runs/tiny-cpu/ppo --include_path rlhfchat/eval/tasks \
        --tasks rlhfchat --apply_chat_template          # the same tasks through lm-eval's own CLI

Each `rlhfchat_*.yaml` here is a task in lm-eval's own YAML format; its items live in `data/*.jsonl` and are read
through `local_data.load` (lm-eval's `custom_dataset` hook), which resolves the file beside the YAML, so the tasks
work from a source checkout and from an installed wheel alike. The prompts are bare questions: they are meant to be
run with the model's chat template applied (`rlhfchat eval` does so for these tasks).

- rlhfchat_math     generate_until: "What is 17 + 8?"; exact match of the last integer of the reply (the same rule
                    as `rlhfchat.data.samples.extract_answer`). One item per held-out problem of the sample data
                    (`samples.held_out_problems()`): no train split holds it in any phrasing, not even as a step of
                    a worked solution, so the task measures arithmetic the model composes, not recalls.
- rlhfchat_code     multiple_choice: a Python-function request; the correct reply against the same reply with a wrong
                    expression and one that does not compile. acc / acc_norm.
- rlhfchat_grammar  multiple_choice: a grammar fix; the corrected sentence against the error swapped in and "already
                    correct". acc / acc_norm.

The items are drawn from the sample data's own problem families; regenerate them (byte-identical) with

    python -m rlhfchat.eval.tasks.build
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""Pass as lm-eval's `include_path`."""
LOCAL_TASKS = ("rlhfchat_math", "rlhfchat_code", "rlhfchat_grammar")
"""Task names defined here (the tag `rlhfchat` names all three)."""
