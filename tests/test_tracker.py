"""HistoryTracker against a dict-based pure-Python reference of the ERPO temperature rule.

The reference keeps temperatures as exact decimals (`Decimal`), so it also pins down the "no float drift"
promise: after any walk the tracker's temperature must equal the exact decimal, rounded once.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from collections import Counter
from decimal import Decimal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erpo_fast.tracker import GroupStats, HistoryTracker


class ReferenceTracker:
    """The rule, written the obvious way: one dict per prompt, exact decimal temperatures."""

    def __init__(self, num_prompts, base_temperature, temperature_step, max_temperature, success_threshold,
                 history):
        self.base, self.step = Decimal(repr(base_temperature)), Decimal(repr(temperature_step))
        self.max = Decimal(repr(max_temperature))
        self.threshold, self.history = success_threshold, history
        self.prompts = {p: {"T": self.base, "seen": 0, "streak": 0, "last": -1, "means": []}
                        for p in range(num_prompts)}
        self.counter = 0

    def update(self, ids, rewards, step=None):
        step = self.counter if step is None else step
        stats = {"all_correct": 0, "all_wrong": 0, "mixed": 0, "revived": 0,
                 "never_seen": sum(self.prompts[p]["seen"] == 0 for p in ids)}
        for p, row in zip(ids, rewards):
            s = self.prompts[p]
            if all(r >= self.threshold for r in row):
                stats["all_correct"] += 1
                s["T"] = min(s["T"] + self.step, self.max)
                s["streak"] += 1
            elif all(r < self.threshold for r in row):
                stats["all_wrong"] += 1
                s["T"] = max(s["T"] - self.step, self.base)
                s["streak"] = 0
            else:
                stats["mixed"] += 1
                if s["T"] > self.base:
                    stats["revived"] += 1
                s["streak"] = 0
            s["means"] = (s["means"] + [math.fsum(row) / len(row)])[-self.history:]
            s["seen"] += 1
            s["last"] = step
        self.counter = step + 1
        return stats


def assert_matches(tracker: HistoryTracker, ref: ReferenceTracker) -> None:
    n = len(ref.prompts)
    expected_T = np.array([float(ref.prompts[p]["T"]) for p in range(n)], dtype=np.float32)
    np.testing.assert_array_equal(tracker.temperatures(np.arange(n)), expected_T)
    np.testing.assert_array_equal(tracker.times_seen, [ref.prompts[p]["seen"] for p in range(n)])
    np.testing.assert_array_equal(tracker.correct_streak, [ref.prompts[p]["streak"] for p in range(n)])
    np.testing.assert_array_equal(tracker.last_seen_step, [ref.prompts[p]["last"] for p in range(n)])
    for p in range(n):
        # Stored as float32; the tracker may sum a group in another order, hence a float32-sized tolerance.
        np.testing.assert_allclose(tracker.recent_mean_rewards(p), ref.prompts[p]["means"], rtol=1e-6, atol=1e-7)
    expected_counts = Counter(float(s["T"]) for s in ref.prompts.values() if s["seen"] > 0)
    assert tracker.temperature_counts() == dict(expected_counts)
    assert tracker.step == ref.counter


REWARD_VALUES = [-1.0, 0.0, 0.25, 0.3, 0.5, 1.0, 1.5]


@st.composite
def scenarios(draw):
    base = Decimal(draw(st.sampled_from(["0.5", "0.7", "1.0"])))
    span = Decimal(draw(st.sampled_from(["0", "0.3", "0.5", "1.0"])))
    config = dict(
        num_prompts=draw(st.integers(1, 8)),
        base_temperature=float(base),
        # 0.123456789 shares no divisor with the spans: temperature_counts() takes its sorting path.
        temperature_step=float(draw(st.sampled_from(["0", "0.1", "0.2", "0.25", "0.3", "0.7", "0.123456789"]))),
        max_temperature=float(base + span),  # exact decimal sum: 0.7 + 0.3 is 1.0, not 0.9999999999999999
        success_threshold=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        history=draw(st.integers(1, 4)),
    )
    batches = []
    for _ in range(draw(st.integers(1, 8))):
        size, group = draw(st.integers(0, 6)), draw(st.integers(1, 4))
        ids = draw(st.lists(st.integers(0, config["num_prompts"] - 1), min_size=size, max_size=size))
        rewards = draw(st.lists(st.lists(st.sampled_from(REWARD_VALUES), min_size=group, max_size=group),
                                min_size=size, max_size=size))
        step = draw(st.one_of(st.none(), st.integers(0, 50)))
        id_type = draw(st.sampled_from([list, np.int64, np.int32, np.uint16]))
        batches.append((ids, rewards, group, step, id_type))
    return config, batches


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_matches_reference(scenario):
    config, batches = scenario
    tracker, ref = HistoryTracker(**config), ReferenceTracker(**config)
    for ids, rewards, group, step, id_type in batches:
        ids_in = ids if id_type is list else np.array(ids, dtype=id_type)
        stats = tracker.update(ids_in, np.array(rewards, dtype=np.float64).reshape(len(ids), group), step=step)
        assert stats == GroupStats(**ref.update(ids, rewards, step))
        assert_matches(tracker, ref)


def test_hand_worked_example():
    """Duplicates apply in order, revived counts mixed groups that start above base."""
    t = HistoryTracker(3, base_temperature=1.0, temperature_step=0.25, max_temperature=1.5, success_threshold=0.5)
    stats = t.update([0, 0, 1, 2], [[1, 1], [0.5, 0.9], [0, 0.4], [0, 1]])
    assert stats == GroupStats(all_correct=2, all_wrong=1, mixed=1, revived=0, never_seen=4)
    np.testing.assert_array_equal(t.temperatures([0, 1, 2]), np.float32([1.5, 1.0, 1.0]))
    assert t.correct_streak.tolist() == [2, 0, 0] and t.times_seen.tolist() == [2, 1, 1]
    stats = t.update([0, 0, 0], [[0, 1], [0, 0], [0, 1]], step=10)
    # 0 is at 1.5 (mixed: revived), drops to 1.25 (all-wrong), is mixed again at 1.25 (revived again).
    assert stats == GroupStats(all_correct=0, all_wrong=1, mixed=2, revived=2, never_seen=0)
    assert t.temperatures([0])[0] == np.float32(1.25)
    assert t.last_seen_step.tolist() == [10, 0, 0] and t.step == 11
    np.testing.assert_array_equal(t.recent_mean_rewards(0), np.float32([1.0, 0.7, 0.5, 0.0, 0.5]))


def test_no_drift_and_max_is_hit_exactly():
    t = HistoryTracker(1, base_temperature=1.0, temperature_step=0.1, max_temperature=1.5)
    assert 1.0 + 0.1 + 0.1 != 1.2  # plain float steps drift; the tracker's values must equal the literals
    for expected in [1.1, 1.2, 1.3, 1.4, 1.5, 1.5, 1.5]:
        t.update([0], [[1.0]])
        assert t.state_dict()["temperatures"][0] == expected
        assert t.temperatures([0])[0] == np.float32(expected)
    for expected in [1.4, 1.3, 1.2, 1.1, 1.0, 1.0]:
        t.update([0], [[0.0]])
        assert t.state_dict()["temperatures"][0] == expected


def test_walk_returns_exactly_to_base():
    assert max(0.9 + 0.2 - 0.2, 0.9) != 0.9  # a float walk ends just above base, where the clamp misses it
    t = HistoryTracker(1, base_temperature=0.9, temperature_step=0.2, max_temperature=2.0)
    t.update([0, 0], [[1.0], [0.0]])
    assert t.state_dict()["temperatures"][0] == 0.9 and t.temperatures([0])[0] == np.float32(0.9)
    # Above base, a mixed group would count as revived; exactly at base it must not.
    assert t.update([0], [[0.0, 1.0]]).revived == 0


def test_span_not_a_multiple_of_step():
    t = HistoryTracker(1, base_temperature=1.0, temperature_step=0.3, max_temperature=1.5)
    walk = [(1.0, 1.3), (1.0, 1.5), (0.0, 1.2), (0.0, 1.0), (0.0, 1.0)]
    for reward, expected in walk:
        t.update([0], [[reward]])
        assert t.state_dict()["temperatures"][0] == expected


def test_torch_inputs_and_finite_overflow():
    a, b = HistoryTracker(4), HistoryTracker(4)
    ids, rewards = [3, 1, 3], [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    assert a.update(torch.tensor(ids), torch.tensor(rewards, dtype=torch.float32)) == b.update(ids, rewards)
    np.testing.assert_array_equal(a.temperatures(torch.tensor([0, 1, 2, 3])), b.temperatures([0, 1, 2, 3]))
    # Finite rewards whose sum overflows are valid input: the group is still classified.
    assert a.update([0], [[1e308, 1e308]]) == GroupStats(all_correct=1, all_wrong=0, mixed=0, revived=0,
                                                         never_seen=1)


def random_batches(num_prompts, count, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, num_prompts, 5), rng.choice([0.0, 0.5, 1.0], size=(5, 3))) for _ in range(count)]


def assert_same_state(a: HistoryTracker, b: HistoryTracker):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_state_dict_round_trip():
    a = HistoryTracker(6, temperature_step=0.2, history=3)
    for ids, rewards in random_batches(6, 10, seed=0):
        a.update(ids, rewards)
    saved = pickle.loads(pickle.dumps(a.state_dict()))
    b = HistoryTracker(6, temperature_step=0.2, history=3)
    b.load_state_dict(saved)
    assert_same_state(a, b)
    for ids, rewards in random_batches(6, 10, seed=1):
        assert a.update(ids, rewards) == b.update(ids, rewards)
    assert_same_state(a, b)
    assert b.step == 20
    assert not np.array_equal(saved["times_seen"], b.times_seen)  # loading copied; the dict was not mutated


def test_history_stats_read_the_ring_streaks_and_last_seen():
    tr = HistoryTracker(4, history=2)
    assert tr.history_stats([0, 1], step=0) == {"history_reward_mean": 0.0, "correct_streak_max": 0.0,
                                                "steps_since_seen_mean": 0.0}  # nothing seen yet
    tr.update([0, 1], [[1.0, 1.0], [0.0, 1.0]], step=1)
    tr.update([0], [[1.0, 1.0]], step=2)
    tr.update([0, 2], [[0.0, 0.0], [1.0, 1.0]], step=3)  # prompt 0's ring wraps: its last two means are 1, 0
    tr.update([2], [[1.0, 1.0]], step=4)
    stats = tr.history_stats([0, 1, 2, 3], step=6)
    # seen prompts 0, 1, 2: recent means [1, 0], [0.5], [1, 1]; streaks 0, 0, 2; last seen 3, 1, 4
    expected = np.mean([np.mean(tr.recent_mean_rewards(i)) for i in (0, 1, 2)])
    assert expected == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert stats == {"history_reward_mean": pytest.approx(expected), "correct_streak_max": 2.0,
                     "steps_since_seen_mean": pytest.approx((3 + 5 + 2) / 3)}
    assert tr.correct_streak.tolist() == [0, 0, 2, 0] and tr.last_seen_step.tolist() == [3, 1, 4, -1]
    with pytest.raises(ValueError, match="out of range"):
        tr.history_stats([4], step=6)


def test_grow():
    t = HistoryTracker(2)
    t.update([0, 1], [[1.0], [0.5]], step=4)
    t.grow(5)
    assert t.num_prompts == 5
    np.testing.assert_array_equal(t.temperatures(np.arange(5)), np.float32([1.1, 1.0, 1.0, 1.0, 1.0]))
    assert t.times_seen.tolist() == [1, 1, 0, 0, 0] and t.last_seen_step.tolist() == [4, 4, -1, -1, -1]
    t.update([4], [[1.0]])
    assert t.temperatures([4])[0] == np.float32(1.1) and t.recent_mean_rewards(4).tolist() == [1.0]
    t.grow(5)  # same size: a no-op
    assert t.num_prompts == 5
    with pytest.raises(ValueError, match="cannot shrink the tracker from 5 to 3 prompts"):
        t.grow(3)


def test_bad_input_leaves_state_untouched():
    t = HistoryTracker(3)
    before = t.state_dict()
    with pytest.raises(ValueError, match="out of range"):
        t.update([0, 3], [[1.0], [1.0]])  # row 0 is valid and must not be applied
    with pytest.raises(ValueError, match="finite"):
        t.update([0, 1], [[1.0], [math.nan]])
    assert_same_state(t, HistoryTracker(3))
    assert t.step == before["step"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t.update([5], [[1.0]]), r"tracker id 5 \(row 0\) is out of range \[0, 5\)"),
        (lambda t: t.update([0, -1], [[1.0], [1.0]]), r"tracker id -1 \(row 1\) is out of range \[0, 5\)"),
        (lambda t: t.temperatures([2, 7]), r"tracker id 7 \(row 1\) is out of range \[0, 5\)"),
        (lambda t: t.temperatures(np.array([2**64 - 1], dtype=np.uint64)), r"tracker id 18446744073709551615"),
        (lambda t: t.update([0], [[1.0, math.nan]]), r"rewards must be finite; row 0 \(tracker id 0\) has nan"),
        (lambda t: t.update([0], [[-math.inf]]), r"rewards must be finite.*-inf"),
        (lambda t: t.update([0, 1], [[1.0]]), r"got 2 tracker ids but 1 reward rows"),
        (lambda t: t.update([0], [1.0]), r"rewards must be 2-D \[batch, group\], got shape \(1,\)"),
        (lambda t: t.update([0], np.ones((1, 2, 2))), r"rewards must be 2-D"),
        (lambda t: t.update([0], np.ones((1, 0))), r"G == 0"),
        (lambda t: t.update([0], [["a"]]), r"rewards must be a 2-D array of numbers"),
        (lambda t: t.update([0.0], [[1.0]]), r"tracker_ids must be integers, got dtype float64"),
        (lambda t: t.update([True], [[1.0]]), r"tracker_ids must be integers, got dtype bool"),
        (lambda t: t.temperatures([[0]]), r"tracker_ids must be 1-D"),
        (lambda t: t.update([0], [[1.0]], step=-1), r"step must be a non-negative integer"),
        (lambda t: t.update([0], [[1.0]], step=1.5), r"step must be a non-negative integer"),
        (lambda t: t.recent_mean_rewards(5), r"tracker id 5 is out of range \[0, 5\)"),
        (lambda t: t.recent_mean_rewards(1.0), r"tracker_id must be an integer"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(HistoryTracker(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_prompts=-1), r"num_prompts must be an integer >= 0, got -1"),
        (dict(num_prompts=2.5), r"num_prompts must be an integer >= 0"),
        (dict(base_temperature=0.0), r"base_temperature must be > 0"),
        (dict(base_temperature=math.nan), r"base_temperature must be a finite number"),
        (dict(max_temperature=0.9), r"max_temperature \(0.9\) must be >= base_temperature \(1.0\)"),
        (dict(temperature_step=-0.1), r"temperature_step must be >= 0"),
        (dict(temperature_step=1e-12), r"resolution"),
        (dict(history=0), r"history must be an integer >= 1, got 0"),
        (dict(max_temperature=1e7), r"max_temperature and temperature_step must be <= 1e\+06"),
        (dict(success_threshold="1"), r"success_threshold must be a finite number"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistoryTracker(**{"num_prompts": 4, **kwargs})


def test_load_state_dict_validates():
    src = HistoryTracker(4)
    src.update([1, 2], [[1.0], [0.0]])
    good = src.state_dict()
    cases = [
        (HistoryTracker(4, temperature_step=0.2), good, r"temperature_step=0.1 but this tracker has 0.2"),
        (HistoryTracker(4, history=3), good, r"history=8 but this tracker has 3"),
        (HistoryTracker(5), good, r"state_dict has 4 prompts but this tracker has 5"),
        (HistoryTracker(4), {k: v for k, v in good.items() if k != "times_seen"}, r"missing \['times_seen'\]"),
        (HistoryTracker(4), {**good, "times_seen": np.zeros(3, np.int64)}, r"'times_seen'.*shape \(4,\)"),
        (HistoryTracker(4), {**good, "correct_streak": np.zeros(4)}, r"'correct_streak'.*integer dtype"),
        (HistoryTracker(4), {**good, "temperatures": np.full(4, 1.05)}, r"values this config cannot reach"),
        (HistoryTracker(4), {**good, "temperatures": np.full(4, 2.0)}, r"values this config cannot reach"),
        (HistoryTracker(4), {**good, "temperatures": np.full(4, np.nan)}, r"cannot reach \(NaN or inf\)"),
        (HistoryTracker(4), {**good, "correct_streak": np.full(4, 3)}, r"counters are inconsistent"),
        (HistoryTracker(4), {**good, "step": -2}, r"'step'\] must be a non-negative integer"),
    ]
    for tracker, state, match in cases:
        with pytest.raises(ValueError, match=match):
            tracker.load_state_dict(state)


def test_works_without_a_writable_numba_cache():
    """With no usable cache directory anywhere, the kernels compile per process instead of failing."""
    code = (
        "import numba.core.caching as caching\n"
        "def refuse(self):\n"
        "    raise OSError('read-only file system')\n"
        "caching._CacheLocator.ensure_cache_path = refuse\n"
        "from erpo_fast import tracker\n"
        "assert type(tracker._update_groups._cache).__name__ == 'NullCache'\n"
        "t = tracker.HistoryTracker(3)\n"
        "print(t.update([0, 0], [[1.0], [1.0]]), t.temperatures([0]).tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "all_correct=2" in proc.stdout and "[1.2000000476837158]" in proc.stdout
