"""Held-out replies side by side, sorted by how much the reward changed between two models.

The report shows the prompts where the change was largest each way (`EXAMPLES` of each) and links `samples.md`,
which holds every held-out prompt in the same order, with every model's reply, its reward by the run's reward model
and, where they exist, the judge's score and whether a math answer is right. `replies.jsonl` holds the same,
machine-readable.
"""

from __future__ import annotations

import html
import unicodedata
from typing import Any

EXAMPLES = 3
"""Prompts shown in the report for each direction of change (largest rise first, then largest fall)."""


def cell(text: str) -> str:
    """A table cell: control characters dropped, HTML-escaped, pipes escaped, newlines as <br>."""
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c) != "Cc")
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or "&nbsp;"


def num(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def change_pair(results: dict[str, Any]) -> tuple[str, str] | None:
    """(later, earlier): the two models whose reward change orders the samples: the first trained policy over its
    reference (the run's baseline: ppo, dpo or kto over sft; a round over the one before), else the table's last two."""
    names = [r["model"] for r in results["models"]]
    baseline = results.get("baseline", "sft")
    policy = next((r["model"] for r in results["models"] if r.get("kl_reference") == baseline), None)
    if policy is not None and baseline in names:
        return policy, baseline
    return (names[-1], names[-2]) if len(names) >= 2 else None


def change(rec: dict[str, Any], pair: tuple[str, str] | None) -> float | None:
    """reward(later) - reward(earlier) of one prompt's replies; None without both rewards."""
    if pair is None:
        return None
    a, b = (rec["replies"].get(m, {}).get("reward") for m in pair)
    return None if a is None or b is None else a - b


def by_change(replies: list[dict[str, Any]], pair: tuple[str, str] | None) -> list[dict[str, Any]]:
    """Every prompt's record, largest rise in reward first, largest fall last (ties and unscored in prompt order)."""
    keyed = [(change(rec, pair), i, rec) for i, rec in enumerate(replies)]
    return [rec for _, _, rec in sorted(keyed, key=lambda k: (k[0] is None, -(k[0] or 0.0), k[1]))]


def shown(replies: list[dict[str, Any]], pair: tuple[str, str] | None,
          k: int = EXAMPLES) -> list[tuple[str, dict[str, Any]]]:
    """The report's examples: [(heading, record)], the k largest rises then the k largest falls (none twice)."""
    ordered = [rec for rec in by_change(replies, pair) if change(rec, pair) is not None]
    if not ordered:
        return [("", rec) for rec in replies[:k]]
    rises = [rec for rec in ordered if change(rec, pair) > 0][:k]
    falls = [rec for rec in reversed(ordered) if change(rec, pair) < 0 and rec not in rises][:k]
    return [("rise", rec) for rec in rises] + [("fall", rec) for rec in falls]


def _prompt_text(rec: dict[str, Any]) -> tuple[str, bool]:
    """(the prompt as shown, whether it is more than one line or turn)."""
    turns = [f"{m['role']}: {m['content']}" for m in rec["prompt"] if m["role"] != "system"]
    prompt = turns[-1].removeprefix("user: ") if len(turns) == 1 else "\n".join(turns)
    return prompt, len(turns) > 1 or "\n" in prompt


def render(rec: dict[str, Any], names: list[str], title: str, pair: tuple[str, str] | None) -> list[str]:
    """One prompt's replies side by side as markdown: a heading, the prompt, a table with a column per model."""
    prompt, long = _prompt_text(rec)
    delta = change(rec, pair)
    lines = [f"### {title}{cell(prompt.splitlines()[0][:100])}", ""]
    if delta is not None:
        lines += [f"Reward of {pair[0]} minus {pair[1]}: **{delta:+.3f}** (by the run's reward model).", ""]
    if long:
        lines += ["```text", prompt, "```", ""]
    lines += ["| | " + " | ".join(f"**{m}**" for m in names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| reply | " + " | ".join(cell(rec["replies"][m]["text"]) for m in names) + " |")
    lines.append("| reward (run's reward model) | " + " | ".join(num(rec["replies"][m].get("reward"))
                                                           for m in names) + " |")
    if any("judge" in rec["replies"][m] for m in names):
        lines.append("| score by eval.judge | " + " | ".join(num(rec["replies"][m].get("judge")) for m in names)
                     + " |")
    if any("correct" in rec["replies"][m] for m in names):
        lines.append("| math answer | " + " | ".join({1.0: "right", 0.0: "wrong"}.get(rec["replies"][m].get("correct"),
                                                                                     "–") for m in names) + " |")
    lines.append("")
    return lines


def samples_markdown(run_name: str, replies: list[dict[str, Any]], results: dict[str, Any]) -> str:
    """samples.md: every held-out prompt, sorted by the change in reward, each answered side by side."""
    names = [r["model"] for r in results["models"]]
    pair = change_pair(results)
    order = (f"sorted by the change in reward from **{pair[1]}** to **{pair[0]}** (the run's reward model's score), "
             "largest rise first" if pair else "in prompt order")
    md = [f"# {run_name}: every held-out reply", "",
          f"{len(replies)} held-out prompts, {order}. The run's reward model is the one PPO trains against.", ""]
    for n, rec in enumerate(by_change(replies, pair), 1):
        md += render(rec, names, f"{n}. ", pair)
    return "\n".join(md).rstrip() + "\n"
