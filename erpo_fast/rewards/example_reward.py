"""An example custom verifier: ``--data.reward erpo_fast/rewards/example_reward.py:exact_match``
(or ``--data.reward erpo_fast.rewards.example_reward:exact_match``).

A verifier is a module-level function ``fn(response: str, answer: str) -> float``:

- ``response`` is the decoded model output (special tokens stripped), ``answer`` the dataset's ``answer``
  field as a string; return the reward, usually 1.0 for correct and 0.0 for wrong.
- It runs in the reward worker processes (``data.reward_workers``), each response within
  ``data.reward_timeout_s`` seconds. A timeout, an exception or a non-finite return scores 0, is counted in
  ``reward_timeouts`` / ``reward_errors`` and is written to ``events.jsonl``; the run goes on.
- Optional: ``fn.prepare_answer = f`` where ``f(answer)`` does the work that depends on the gold answer alone
  (parsing it). A worker runs it once per distinct answer and times it apart from the response, so that a
  slow gold answer is reported as ``slow: "gold"`` instead of being blamed on the model's response.
"""

from __future__ import annotations

import re

_FINAL = re.compile(r"(?:answer\s*(?:is|:)\s*)([^\n.]+)", re.IGNORECASE)


def _normalise(text: str) -> str:
    return " ".join(str(text).strip().lower().split()).rstrip(".")


def normalised_gold(answer: str) -> str:
    gold = _normalise(answer)
    if not gold:
        raise ValueError("exact_match needs a non-empty gold answer")
    return gold


def exact_match(response: str, answer: str) -> float:
    """1.0 when the text after the last "answer is"/"answer:" (else the last line) equals the gold answer,
    case and whitespace aside."""
    found = _FINAL.findall(response)
    lines = response.strip().splitlines()
    final = found[-1] if found else (lines[-1] if lines else "")
    return 1.0 if _normalise(final) == normalised_gold(answer) else 0.0


exact_match.prepare_answer = normalised_gold
