"""Verifiers (exact arithmetic, math-verify) and the worker pool's timeout / error handling."""

from __future__ import annotations

import logging
import os
import time

import pytest

from erpo_fast.rewards import RewardPool, get_reward_fn
from erpo_fast.tasks.arithmetic import extract_final_integer
from erpo_fast.tasks.arithmetic import reward as arithmetic_reward


@pytest.mark.parametrize("response, answer, expected", [
    ("85", "85", 1.0),
    ("47+38=85", "85", 1.0),
    ("3-7=-4", "-4", 1.0),
    ("-4", "4", 0.0),  # the sign is part of the number
    ("12-5", "5", 1.0),  # a minus after a digit is the operator, not a sign
    ("the answer is 12, no wait 13", "12", 0.0),  # the LAST integer counts
    ("085", "85", 0.0),  # exact text
    ("85 ", " 85", 1.0),
    ("no digits here", "0", 0.0),
    ("", "7", 0.0),
    ("x=100000000000000000000007", "100000000000000000000007", 1.0),
])
def test_arithmetic_reward(response, answer, expected):
    assert arithmetic_reward(response, answer) == expected


def test_final_integer_extraction_and_bad_gold():
    assert extract_final_integer("a1b22c-333") == "-333"
    assert extract_final_integer("none") is None
    with pytest.raises(ValueError, match="integer answer"):
        arithmetic_reward("1/2", "1/2")


def test_math_reward_uses_symbolic_equivalence():
    from erpo_fast.rewards.math import math_reward

    assert math_reward("So the answer is \\boxed{42}.", "42") == 1.0
    assert math_reward("The answer is $0.5$", "\\frac{1}{2}") == 1.0
    assert math_reward("\\boxed{1+x^2}", "$x^2+1$") == 1.0
    assert math_reward("\\boxed{\\frac{1}{3}}", "\\boxed{\\frac{1}{2}}") == 0.0
    assert math_reward("I think it is 41", "42") == 0.0
    assert math_reward("", "42") == 0.0
    with pytest.raises(ValueError, match="non-empty gold"):
        math_reward("\\boxed{1}", "  ")


def test_get_reward_fn():
    assert get_reward_fn("arithmetic") is arithmetic_reward
    assert get_reward_fn("math").__name__ == "math_reward"
    with pytest.raises(ValueError,
                       match="unknown reward 'code'; choose from arithmetic, digits, math, or module:function"):
        get_reward_fn("code")


def flaky_verifier(response: str, answer: str) -> float:
    """Module-level (so workers can import it): hangs, raises or dies on cue, else checks exactly."""
    if response == "hang":
        time.sleep(120)
    if response == "raise":
        raise RuntimeError("verifier bug")
    if response == "die":
        os._exit(7)
    return arithmetic_reward(response, answer)


PAIRS = [("12", "12"), ("13", "12"), ("hang", "1"), ("x=-4", "-4"), ("raise", "3"), ("die", "2"), ("5", "5")]
EXPECTED = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_pool_times_out_hung_verifications_and_survives_errors(caplog):
    with caplog.at_level(logging.WARNING, logger="erpo_fast.rewards.pool"), \
            RewardPool(flaky_verifier, num_workers=2, timeout_s=1.0) as pool:
        started = time.monotonic()
        assert pool.score(PAIRS) == EXPECTED
        assert time.monotonic() - started < 60  # the 120 s sleep was cut short
        stats = pool.last_stats
        assert (stats.num_scored, stats.num_timeouts, stats.num_errors) == (7, 1, 2)
        assert stats.num_restarts == 2  # the hung worker and the dead one were replaced
        # The pool keeps working with its replacement workers, and keeps its order on larger inputs.
        many = [(str(i), str(i if i % 3 else i + 1)) for i in range(200)]
        assert pool.score(many) == [0.0 if i % 3 == 0 else 1.0 for i in range(200)]
        assert (pool.last_stats.num_timeouts, pool.last_stats.num_errors) == (0, 0)
        assert pool.total_stats.num_scored == 207
        assert all(w.process.is_alive() for w in pool._workers)
        workers = [w.process for w in pool._workers]
    assert not any(p.is_alive() for p in workers)  # close() stopped them
    assert "verification of item 2 timed out after 1 s (the verifier was slow)" in caplog.text
    assert "response='hang'" in caplog.text
    assert "RuntimeError: verifier bug" in caplog.text and "worker process died (exit code 7)" in caplog.text
    with pytest.raises(RuntimeError, match="after close"):
        pool.score(PAIRS)


def test_pool_in_process_counts_errors_without_timeouts():
    with RewardPool(flaky_verifier, num_workers=0, timeout_s=1.0) as pool:
        pairs = [p for p in PAIRS if p[0] not in ("hang", "die")]
        assert pool.score(pairs) == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert (pool.last_stats.num_errors, pool.last_stats.num_timeouts) == (1, 0)
        assert pool.score([]) == []


def test_pool_runs_math_verify_in_a_worker():
    # math-verify's signal-based guard is off in workers; the pool's own timeout applies.
    with RewardPool(get_reward_fn("math"), num_workers=1, timeout_s=30.0) as pool:
        assert pool.score([("\\boxed{0.25}", "\\frac{1}{4}"), ("\\boxed{3}", "2")]) == [1.0, 0.0]
        assert pool.last_stats.num_errors == 0


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="module-level function"):
        RewardPool(lambda r, a: 1.0, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(arithmetic_reward, num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(arithmetic_reward, num_workers=0, timeout_s=0)
    with RewardPool(arithmetic_reward, num_workers=0) as pool, pytest.raises(ValueError, match=r"pairs\[1\]"):
        pool.score([("1", "1"), ("1",)])
