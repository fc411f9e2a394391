"""Exact checker for integer answers (the built-in arithmetic task).

Extraction rule: the response's final answer is its LAST integer literal, read with Python's `re` as
`(?<!\\d)-?\\d+`: an optional minus sign directly before the digits counts as the number's sign, so
"3-7=-4" ends in -4, while in "12-5" the final integer is 5 (a minus that follows a digit is the operator).
The reward is 1.0 when that literal equals the gold answer exactly as text (so "085" does not match "85"),
else 0.0; a response without any integer scores 0.0.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"(?<!\d)-?\d+")
_GOLD = re.compile(r"-?\d+")


def extract_final_integer(response: str) -> str | None:
    """The last integer literal in `response` (with its sign), or None when there is none."""
    last = None
    for last in _INTEGER.finditer(response):  # noqa: B007 - only the last match is wanted
        pass
    return None if last is None else last.group()


def _check_gold(answer: str) -> str:
    gold = str(answer).strip()
    if not _GOLD.fullmatch(gold):
        raise ValueError(f"arithmetic_reward needs an integer answer, got {answer!r}")
    return gold


def arithmetic_reward(response: str, answer: str) -> float:
    """1.0 when the response's last integer equals the integer `answer` exactly, else 0.0."""
    return 1.0 if extract_final_integer(response) == _check_gold(answer) else 0.0


arithmetic_reward.prepare_answer = _check_gold  # the gold-only stage (see erpo_fast.rewards.pool)
