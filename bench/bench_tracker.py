"""ERPO history tracker: Numba `HistoryTracker` vs a plain-Python dict tracker, per training step.

One step = `temperatures(ids)` + `update(ids, rewards)` for B groups of G rewards. The two are timed
apart, each on fresh random ids, because in training a rollout runs between them and the prompts' state
is out of cache by the time `update` comes. The fast tracker's cost should not depend on num_prompts, so
it runs at 10k, 1M and 10M prompts. The first-call JIT compile is excluded from the step timings and
measured on its own in fresh processes (cold cache, then warm cache).

Run: `python -m bench.bench_tracker` or `python bench/bench_tracker.py` from the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `bench` and `erpo_fast` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import print_table, time_fn, write_results  # noqa: E402
from erpo_fast.tracker import HistoryTracker  # noqa: E402

BATCH, GROUP = 512, 16
SIZES = (10_000, 1_000_000, 10_000_000)
CONFIG = dict(base_temperature=1.0, temperature_step=0.1, max_temperature=1.5, success_threshold=1.0, history=8)


class DictTracker:
    """The same rule in plain Python: a dict from prompt id to its record, created on first sight."""

    def __init__(self, base_temperature, temperature_step, max_temperature, success_threshold, history):
        self.base, self.step, self.max = base_temperature, temperature_step, max_temperature
        self.threshold, self.history = success_threshold, history
        self.state = {}  # prompt id -> [temperature, times_seen, streak, last_seen, deque of group means]
        self.counter = 0

    def temperatures(self, prompt_ids):
        state, base = self.state, self.base
        return np.array([state[p][0] if p in state else base for p in prompt_ids.tolist()], dtype=np.float32)

    def update(self, prompt_ids, rewards):
        counts = {"all_correct": 0, "all_wrong": 0, "mixed": 0, "revived": 0}
        for p, row in zip(prompt_ids.tolist(), rewards.tolist()):
            rec = self.state.get(p)
            if rec is None:
                rec = self.state[p] = [self.base, 0, 0, -1, deque(maxlen=self.history)]
            if min(row) >= self.threshold:
                counts["all_correct"] += 1
                rec[0] = min(rec[0] + self.step, self.max)
                rec[2] += 1
            elif max(row) < self.threshold:
                counts["all_wrong"] += 1
                rec[0] = max(rec[0] - self.step, self.base)
                rec[2] = 0
            else:
                counts["mixed"] += 1
                counts["revived"] += rec[0] > self.base
                rec[2] = 0
            rec[4].append(sum(row) / len(row))
            rec[1] += 1
            rec[3] = self.counter
        self.counter += 1
        return counts


def make_batches(num_prompts: int, count: int, seed: int = 0):
    """`count` batches of fresh random ids (repeats allowed), so every step reaches prompt state that is
    not in cache, as in a run over a large dataset. Rewards cycle through 8 matrices of 0/1 floats (success
    rates from hard to easy), which stay cache-hot like rewards a verifier has just written."""
    rng = np.random.default_rng(seed)
    p_correct = rng.choice([0.0, 0.3, 0.7, 0.95, 1.0], size=(8, BATCH, 1))
    reward_sets = (rng.random((8, BATCH, GROUP)) < p_correct).astype(np.float64)
    return [(rng.integers(0, num_prompts, BATCH, dtype=np.int64), reward_sets[i % 8]) for i in range(count)]


def stepper(call, batches, steps_per_call: int):
    """A callable that makes the next `steps_per_call` calls `call(ids, rewards)`, each on a batch never
    used before. In training, rollout runs between `temperatures` and `update`, so each meets cold state."""
    pending = iter(batches)

    def run() -> None:
        for _ in range(steps_per_call):
            call(*next(pending))

    return run


def ids_only(method):
    return lambda ids, rewards: method(ids)


def time_per_call(call, num_prompts: int, steps_per_call: int, iters: int, seed: int) -> dict:
    """Microseconds per call: median and min over `iters` timed runs of `steps_per_call` calls."""
    batches = make_batches(num_prompts, steps_per_call * (iters + 1), seed=seed)
    t = time_fn(stepper(call, batches, steps_per_call), warmup=1, iters=iters)  # warmup also JIT-loads
    return {"median_us": t["median_s"] / steps_per_call * 1e6, "min_us": t["min_s"] / steps_per_call * 1e6}


_JIT_PROBE = """
import json, time
t0 = time.perf_counter()
import numpy as np
from erpo_fast.tracker import HistoryTracker
t1 = time.perf_counter()
tracker = HistoryTracker(1000)
ids = np.arange(16, dtype=np.int64)
tracker.update(ids, np.ones((16, 4)))
tracker.temperatures(ids)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_calls_s": t2 - t1}))
"""


def measure_jit() -> dict:
    """First update+temperatures call in a fresh process: once with an empty Numba cache, once warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}  # checked before the in-tree __pycache__
        for label in ("cold_cache", "warm_cache"):
            proc = subprocess.run([sys.executable, "-c", _JIT_PROBE], env=env, capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent.parent, check=True)
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    rows = []
    for num_prompts in SIZES:
        fast, slow = HistoryTracker(num_prompts, **CONFIG), DictTracker(**CONFIG)
        timings = {
            "numba_temperatures": time_per_call(ids_only(fast.temperatures), num_prompts, 64, 21, 1),
            "numba_update": time_per_call(fast.update, num_prompts, 64, 21, 2),
            "dict_temperatures": time_per_call(ids_only(slow.temperatures), num_prompts, 8, 9, 3),
            "dict_update": time_per_call(slow.update, num_prompts, 8, 9, 4),
        }
        row = {"num_prompts": num_prompts}
        row.update({f"{name}_us": t["median_us"] for name, t in timings.items()})
        row["numba_step_us"] = row["numba_temperatures_us"] + row["numba_update_us"]
        row["dict_step_us"] = row["dict_temperatures_us"] + row["dict_update_us"]
        row["speedup"] = row["dict_step_us"] / row["numba_step_us"]
        # Minimums are the steadier figure on a machine shared with other work.
        mins = {name: t["min_us"] for name, t in timings.items()}
        row["numba_step_us_min"] = mins["numba_temperatures"] + mins["numba_update"]
        row["dict_step_us_min"] = mins["dict_temperatures"] + mins["dict_update"]
        row["speedup_from_mins"] = row["dict_step_us_min"] / row["numba_step_us_min"]
        row["state_MB"] = fast.nbytes / 2**20
        rows.append(row)
    print_table(rows, ["num_prompts", "numba_temperatures_us", "numba_update_us", "numba_step_us", "dict_step_us",
                       "speedup", "numba_step_us_min", "dict_step_us_min", "speedup_from_mins", "state_MB"],
                title=f"tracker step = temperatures + update, B={BATCH} groups x G={GROUP} rewards "
                      f"(us; medians unless _min)")
    jit = measure_jit()
    print(f"\nfirst call in a fresh process (not in the step timings): cold Numba cache "
          f"{jit['cold_cache']['first_calls_s']:.2f} s, warm cache {jit['warm_cache']['first_calls_s']:.3f} s")
    write_results("tracker", {
        "shapes": {"batch": BATCH, "group": GROUP, "num_prompts": list(SIZES)},
        "config": CONFIG,
        "method": "temperatures(ids) and update(ids, rewards) timed separately, each call on fresh random ids "
                  "(repeats allowed) so prompt state is cold as after a rollout; 0/1 float64 rewards cycling "
                  "through 8 cache-hot matrices; us per call = median (and min) of 21 runs of 64 calls "
                  "(dict: 9 runs of 8 calls); step = temperatures + update; the dict holds only prompts it has seen",
        "rows": rows,
        "first_call_s": jit,
    })


if __name__ == "__main__":
    main()
