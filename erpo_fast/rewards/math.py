"""Math answers checked with Hugging Face's math-verify (`parse` + `verify`, symbolic equivalence via sympy).

The gold answer may be plain ("42", "\\\\frac{1}{2}", "x^2+1") or already LaTeX-delimited ("$...$",
"\\\\boxed{...}"); plain answers are wrapped in \\\\boxed{} so that math-verify's LaTeX extractor reads them.
The response is parsed with math-verify's defaults: a \\\\boxed{} answer or an "answer is ..." phrase first,
then the last LaTeX or plain expression.

math-verify guards itself with `signal.alarm`, which only works in a process's main thread and would
fight a surrounding timeout; by default it is switched off here because `RewardPool` enforces the
per-response timeout by killing the worker. Pass `timeout_s` to keep math-verify's own guard when
calling this directly in a main thread (e.g. with `RewardPool(num_workers=0)`).
"""

from __future__ import annotations

import functools
import logging

from math_verify import parse, verify


class _DropDisabledTimeoutNotice(logging.Filter):
    """math-verify warns once per process that its timeout is off; ours is on (see above), so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutNotice())


def _as_latex_gold(answer: str) -> str:
    answer = str(answer).strip()
    if "\\boxed" in answer or "$" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return "\\boxed{" + answer + "}"


@functools.lru_cache(maxsize=4096)  # the n responses of a group share one gold answer
def _parse_gold(answer: str, timeout_s: int | None):
    gold = parse(_as_latex_gold(answer), parsing_timeout=timeout_s)
    if not gold:
        raise ValueError(f"math-verify could not parse the gold answer {answer!r}")
    return gold


def math_reward(response: str, answer: str, timeout_s: int | None = None) -> float:
    """1.0 when math-verify finds the response's final answer equivalent to `answer`, else 0.0."""
    if not str(answer).strip():
        raise ValueError("math_reward needs a non-empty gold answer")
    gold = _parse_gold(str(answer), timeout_s)
    predicted = parse(response, parsing_timeout=timeout_s)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=timeout_s) else 0.0


def _prepare_gold(answer: str) -> None:
    if str(answer).strip():
        _parse_gold(str(answer), None)  # cached: math_reward then reuses the parsed gold


# The gold-only stage, run and timed apart from the response (see erpo_fast.rewards.pool), so that a gold
# answer that math-verify chokes on is not blamed on the model's response.
math_reward.prepare_answer = _prepare_gold
