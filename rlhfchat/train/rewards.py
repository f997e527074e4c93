"""Rewards for the RL stage: the reward model, a verifiable math check and a user's own function, combined with weights.

    ppo:
      rewards:
        - {kind: reward_model, weight: 1.0}             # the run's reward model (reward/)
        - {kind: math, weight: 2.0}                     # 1 when the reply's final answer equals the prompt's reference
        - {kind: function, function: "mypkg.rewards:brevity", weight: 0.5}

    rewards = Rewards(components, scorer)               # scorer: the reward model (None when no component needs it)
    total, parts = rewards.score(prompts, replies, records)   # (N,), {"reward_model": (N,), "math": (N,), ...}

The reward of a reply is the weighted sum of its components; every component is logged on its own (`parts`).

- `reward_model`: the reward model's score of (prompt, reply).
- `math`: 1.0 when the reply's final answer (rlhfchat.data.answers.final_answer: "#### N", "The answer is N", else the
  last number) equals the prompt record's `reference`; 0.0 when it does not, or when the prompt has no reference.
- `function`: a Python function named `module:function` (the module importable, e.g. a file on PYTHONPATH):

      def my_reward(prompt: list[dict[str, str]], reply: str, record: dict) -> float: ...

  `prompt` is the chat messages the model answered, `reply` its reply (cut at stop sequences), `record` the whole
  canonical prompt record (`id`, `source`, `prompt` and, where the data has one, `reference`). It must return a
  number; anything else is an error naming the component and the prompt.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable, Sequence

import torch

from rlhfchat.config import function_path
from rlhfchat.data.answers import answers_match
from rlhfchat.errors import RlhfchatError

KINDS = ("reward_model", "math", "function")
RewardFunction = Callable[[list, str, dict], float]


def load_function(path: str, where: str) -> RewardFunction:
    """The function `module:function` names; a bad path is a one-line error naming `where` (the recipe key)."""
    module_name, name = function_path(path, where)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error at import
        raise RlhfchatError(f"{where}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RlhfchatError(f"{where}: module {module_name!r} has no function {name!r}")
    return fn


def math_reward(prompt: list, reply: str, record: dict) -> float:
    """1.0 when the reply's final answer equals the record's reference, else 0.0 (also without a reference)."""
    reference = record.get("reference") if isinstance(record, dict) else None
    return float(reference is not None and answers_match(reply, reference))


def check_functions(components: Sequence[Any], key: str = "ppo.rewards") -> None:
    """Import every function component's `module:function` (a bad one is load_function's one-line error)."""
    for i, c in enumerate(components):
        if c.kind == "function":
            load_function(c.function, f"{key}[{i}].function")


def needs_reward_model(components: Sequence[Any]) -> bool:
    """Whether any component is the reward model (else RL can run without loading it)."""
    return any(c.kind == "reward_model" for c in components)


class Rewards:
    """The recipe's reward components; `score` gives the weighted total and each component's values."""

    def __init__(self, components: Sequence[Any], scorer: Any = None, key: str = "ppo.rewards",
                 checks_only: bool = False):
        """components: objects with `kind`, `weight` and (for `function`) `function`; scorer: the reward model
        (train/reward.py's RewardScorer), needed when a component is `reward_model`; `checks_only`: leave the reward_model
        components out (eval scores the replies with the reward model itself)."""
        if not components:
            raise RlhfchatError(f"{key}: expected at least one reward component ({', '.join(KINDS)})")
        self.components: list[tuple[str, float, Any]] = []  # (name, weight, the scorer or a per-reply function)
        self.where: dict[str, str] = {}  # name -> the recipe key, for errors
        names: set[str] = set()
        for i, c in enumerate(components):
            where = f"{key}[{i}]"
            if c.kind not in KINDS:
                raise RlhfchatError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {c.kind!r}")
            if c.kind == "reward_model" and checks_only:
                continue
            if c.kind == "reward_model":
                if scorer is None:
                    raise RlhfchatError(f"{where}: a reward_model component needs the run's reward model")
                fn: Any = scorer
            elif c.kind == "math":
                fn = math_reward
            else:
                if not getattr(c, "function", None):
                    raise RlhfchatError(f"{where}.function: a function component needs module:function")
                fn = load_function(c.function, f"{where}.function")
            name = getattr(c, "name", None) or (c.kind if c.kind != "function" else c.function.split(":")[-1])
            if name in names:
                raise RlhfchatError(f"{where}: two components are named {name!r}; give one a `name`")
            names.add(name)
            self.where[name] = f"{where}.function"
            self.components.append((name, float(c.weight), fn))

    def score(self, prompts: Sequence[Any], replies: Sequence[str], records: Sequence[dict]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total (N,) float32 and each component's values {name: (N,)}, on the CPU."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(replies), dtype=torch.float32)
        for name, weight, fn in self.components:
            if hasattr(fn, "score"):  # the reward model, batched
                values = fn.score(prompts, replies).float().cpu()
            else:
                values = torch.tensor([self._call(self.where[name], name, fn, p, r, rec)
                                       for p, r, rec in zip(prompts, replies, records)], dtype=torch.float32)
            parts[name] = values
            total += weight * values
        return total, parts

    @staticmethod
    def _call(where: str, name: str, fn: RewardFunction, prompt: Any, reply: str, record: dict) -> float:
        value = fn(prompt, reply, record)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            rid = record.get("id") if isinstance(record, dict) else None
            raise RlhfchatError(f"{where}: reward {name!r} returned {type(value).__name__} {value!r} for prompt "
                                f"{rid!r}, expected a float")
        return float(value)
