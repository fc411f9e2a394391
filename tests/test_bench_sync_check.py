"""bench/bench_sync_check.py's bookkeeping: the statistics it reports are the check's own, and its per-tolerance
counts name the checks that would fail (checked on hand-made probes)."""

from __future__ import annotations

import pytest

from bench.bench_sync_check import probe_sizes, probe_statistics, summarize


def _probe(offsets_per_prompt):
    """Prompts whose engine log-probs sit the given offsets above the learner's (learner: -1.0 everywhere)."""
    return [[[-1.0 + o for o in offsets], [-1.0] * len(offsets)] for offsets in offsets_per_prompt]


def test_probe_statistics_are_the_checks_trimmed_mean_and_the_plain_mean():
    probe = _probe([[0.0] * 19 + [4.0], [0.01] * 20])  # 40 tokens: the 2 largest differences are left out
    stats = probe_statistics(probe, 2)
    assert stats["mean_abs_diff"] == pytest.approx((4.0 + 20 * 0.01) / 40, abs=1e-6)
    assert stats["trimmed_mean_abs_diff"] == pytest.approx(19 * 0.01 / 38, abs=1e-6)
    first = probe_statistics(probe, 1)  # 20 tokens: 1 left out, the outlier
    assert (first["trimmed_mean_abs_diff"], first["mean_abs_diff"]) == pytest.approx((0.0, 4.0 / 20), abs=1e-6)


def test_probe_sizes_end_at_the_probe_itself():
    assert probe_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert probe_sizes(10) == [1, 2, 4, 8, 10]  # a --prompts that is no power of two is reported too
    assert probe_sizes(1) == [1]


def test_summary_counts_the_checks_each_tolerance_would_fail_and_the_first_step():
    def stats(level):
        return {str(k): probe_statistics(_probe([[level] * 20] * k), k) for k in (1, 2)}

    checks = [{"step": 10, "stats": {"synced": stats(0.001), "never_synced": stats(0.008)}},
              {"step": 20, "stats": {"synced": stats(0.003), "never_synced": stats(0.03)}},
              {"step": 30, "stats": {"synced": stats(0.002), "never_synced": stats(0.3),
                                     "stopped_at_20": stats(0.015)}}]
    by_size, by_tolerance = summarize(checks)
    assert [(r["prompts"], r["statistic"]) for r in by_size] == [
        (1, "trimmed_mean_abs_diff"), (1, "mean_abs_diff"), (2, "trimmed_mean_abs_diff"), (2, "mean_abs_diff"),
        (2, "max_abs_diff")]
    assert by_size[-1]["never_synced_max"] == pytest.approx(0.3, abs=1e-6)
    row = next(r for r in by_size if r["prompts"] == 2 and r["statistic"] == "trimmed_mean_abs_diff")
    assert row["synced_max"] == pytest.approx(0.003, abs=1e-6)
    assert row["never_synced_median"] == pytest.approx(0.03, abs=1e-6)
    at = {(r["statistic"], r["atol"]): r for r in by_tolerance}
    r = at[("trimmed_mean_abs_diff", 0.01)]
    assert (r["synced_fails"], r["synced_first"]) == ("0/3", None)
    assert (r["never_synced_fails"], r["never_synced_first"]) == ("2/3", 20)
    assert (r["stopped_at_20_fails"], r["stopped_at_20_first"]) == ("1/1", 30)
    assert at[("trimmed_mean_abs_diff", 0.005)]["never_synced_first"] == 10
