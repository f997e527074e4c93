"""Final answers in text: what a math reply's answer is, and whether it equals a reference answer.

    final_answer("48 + 24 = 72. The answer is 72.")       # "72"
    final_answer("... she has 1,250 left.\\n#### 1,250")   # "1250"
    answers_match("So x = -3.50.", "-3.5")                # True

The answer of a text is, in this order of precedence:
1. the number after the last GSM8K marker `#### N`;
2. the number after the last "the answer is" (any case; an optional colon, `$` or `=` between);
3. the last number in the text.
Numbers may be negative (`-` or the Unicode minus, when not glued to a word or digit before it), have thousands
separators (`1,234,567`) and decimals (`3.25`); a trailing full stop is punctuation, not a decimal point. Answers
are compared as decimal numbers, so "72", "72.0" and "+72" are one answer, "1,000" and "1000" too.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"(?:(?<![\w.,])[-\u2212+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER.replace("(?<![\\w.,])", "") + ")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*[:=]?\s*\$?\s*(" + _NUMBER.replace("(?<![\\w.,])", "") + ")",
                           re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """A number as written (`-1,234.50`, `\u22123`, `+7`) -> Decimal, or None when `text` is not one number."""
    cleaned = text.strip().replace(",", "").replace("\u2212", "-")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        return None


def canonical(number: Decimal) -> str:
    """One spelling per value: no exponent, no trailing zeros after the point, no "-0"."""
    if number == 0:
        return "0"
    text = format(number.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def final_answer(text: str) -> str | None:
    """The canonical final answer of a reply or a reference (see the module docstring), or None if it has none."""
    for pattern in (_GSM8K_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            value = parse_number(found[-1])
            if value is not None:
                return canonical(value)
    found = _NUMBER_RE.findall(text)
    for candidate in reversed(found):
        value = parse_number(candidate)
        if value is not None:
            return canonical(value)
    return None


def answers_match(reply: str, reference: str | int | float) -> bool:
    """Whether the reply's final answer equals the reference's (a number, or a text with a final answer)."""
    want = final_answer(str(reference))
    return want is not None and final_answer(reply) == want
