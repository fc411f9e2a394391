"""ERPO's per-prompt history: each prompt's sampling temperature, driven by how its groups came back.

A group (the responses sampled for one prompt) is all-correct when every reward >= `success_threshold`,
all-wrong when every reward is below it, and mixed otherwise.

    all-correct: T <- min(T + step, max)     (residual prompt: explore harder next time)
    all-wrong:   T <- max(T - step, base)
    mixed:       T unchanged                 ("revived" when T was above base: exploring paid off)

Prompts are named by their tracker id: the dense integer `erpo_fast.data.PromptIndex` gives a prompt's key
(not its token ids). Groups apply in batch order, so a tracker id that appears twice in one batch is updated
twice. The tracker also keeps, per prompt, how often it was seen, its current all-correct streak, the step
it was last seen and a ring buffer of its last `history` group mean rewards. The rule does not use them;
`history_stats` reads them for each step's metrics (how hard a batch's prompts have been, how long residual
prompts stay all-correct, how often prompts come back), and the run summary reads `times_seen`.

The state is two flat numpy arrays indexed by tracker id (an int64 table of counters and a float32 ring of
mean rewards), and the loops are Numba kernels, so an update costs O(batch) whatever the number of prompts.
Temperatures are kept as integers in units of 1e-9 (fixed point), so a walk up and back down lands exactly
on base and repeated steps hit max exactly, with no float drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numba
import numpy as np

TEMPERATURE_RESOLUTION = 1e-9  # temperatures are stored as integer multiples of this
_UNITS = 1_000_000_000  # 1 / TEMPERATURE_RESOLUTION, exact as an int
_MAX_TEMPERATURE = 1e6  # keeps max + step well inside int64 units
_MAX_HISTOGRAM_BINS = 1 << 20  # above this, temperature_counts() falls back to sorting

_OK, _BAD_ID, _BAD_REWARD = 0, 1, 2
# Columns of the int64 [num_prompts, 4] state table. Keeping a prompt's counters side by side matters at
# millions of prompts, where every random access misses the cache: one 32-byte row, not four arrays.
_TEMP, _SEEN, _STREAK, _LAST = 0, 1, 2, 3


def _njit(fn):
    # cache=True spares every process the compile, but Numba refuses at decoration time when it finds no
    # writable cache directory (read-only install, no home); then compile per process instead.
    # fastmath "reassoc" lets the reward sums vectorise; not nnan/ninf, which would let LLVM drop the NaN checks.
    try:
        return numba.njit(cache=True, fastmath={"reassoc"})(fn)
    except RuntimeError:
        return numba.njit(cache=False, fastmath={"reassoc"})(fn)


@_njit
def _update_groups(ids, rewards, step, threshold, step_units, base_units, max_units, table, ring):
    """Apply each group in batch order.

    Returns (status, bad_row, all_correct, all_wrong, mixed, revived, never_seen). Passes 0 and 1 check the
    whole batch before pass 2 writes anything, so bad input leaves the state untouched.
    """
    num_prompts = table.shape[0]
    batch, group = rewards.shape
    # Pass 0 checks the ids and counts prompts never seen before this call. Reading every row in a loop
    # this small lets the CPU overlap the cache misses (one per prompt at millions of prompts) that pass 2,
    # with its longer body, would otherwise take nearly one at a time.
    never_seen = 0
    for b in range(batch):
        if ids[b] < 0 or ids[b] >= num_prompts:
            return _BAD_ID, b, 0, 0, 0, 0, 0
        never_seen += table[ids[b], _SEEN] == 0
        # Touch the ring row too (its second cache miss); the NaN test keeps the load alive and adds 0.
        never_seen += ring[ids[b], 0] != ring[ids[b], 0]
    # Pass 1 reduces every group and checks its rewards.
    totals = np.empty(batch, dtype=np.float64)
    num_correct = np.empty(batch, dtype=np.int64)
    for b in range(batch):
        total = 0.0
        correct = 0
        for g in range(group):
            total += rewards[b, g]
            correct += rewards[b, g] >= threshold
        # A NaN or inf makes the sum non-finite; the element check only rules out a finite overflow.
        if not np.isfinite(total) and not np.isfinite(rewards[b]).all():
            return _BAD_REWARD, b, 0, 0, 0, 0, 0
        totals[b] = total
        num_correct[b] = correct
    # Pass 2 applies the groups in batch order, so a repeated id sees its earlier update.
    history = ring.shape[1]
    all_correct = all_wrong = mixed = revived = 0
    for b in range(batch):
        p = ids[b]
        before = table[p, _TEMP]
        if num_correct[b] == group:
            all_correct += 1
            table[p, _TEMP] = min(before + step_units, max_units)
            table[p, _STREAK] += 1
        elif num_correct[b] == 0:
            all_wrong += 1
            table[p, _TEMP] = max(before - step_units, base_units)
            table[p, _STREAK] = 0
        else:
            mixed += 1
            table[p, _STREAK] = 0
            if before > base_units:
                revived += 1
        # The ring's write position is times_seen % history, so it needs no separate cursor.
        ring[p, table[p, _SEEN] % history] = totals[b] / group
        table[p, _SEEN] += 1
        table[p, _LAST] = step
    return _OK, -1, all_correct, all_wrong, mixed, revived, never_seen


@_njit
def _gather_temperatures(ids, table, out):
    """out[b] = temperature of ids[b]; returns the first out-of-range row, or -1."""
    num_prompts = table.shape[0]
    for b in range(ids.shape[0]):
        if ids[b] < 0 or ids[b] >= num_prompts:
            return b
    for b in range(ids.shape[0]):
        out[b] = table[ids[b], _TEMP] / _UNITS
    return -1


@dataclass(frozen=True)
class GroupStats:
    """How the groups of one `update` call came back (each group counted once)."""

    all_correct: int
    all_wrong: int
    mixed: int
    revived: int  # mixed groups whose prompt was above base temperature before this update
    never_seen: int  # groups whose prompt had never been seen before this call (repeats count each time)


_CONFIG_KEYS = ("base_temperature", "temperature_step", "max_temperature", "success_threshold", "history")
_ARRAY_KEYS = ("temperatures", "times_seen", "correct_streak", "last_seen_step", "recent_mean_rewards")


class HistoryTracker:
    """Per-prompt ERPO state for tracker ids 0 .. num_prompts-1 (see the module docstring for the rule)."""

    def __init__(self, num_prompts: int, base_temperature: float = 1.0, temperature_step: float = 0.1,
                 max_temperature: float = 1.5, success_threshold: float = 1.0, history: int = 8):
        num_prompts = _check_count("num_prompts", num_prompts, minimum=0)
        history = _check_count("history", history, minimum=1)
        for name, value in (("base_temperature", base_temperature), ("temperature_step", temperature_step),
                            ("max_temperature", max_temperature), ("success_threshold", success_threshold)):
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if base_temperature <= 0:
            raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
        if max_temperature < base_temperature:
            raise ValueError(f"max_temperature ({max_temperature}) must be >= base_temperature "
                             f"({base_temperature})")
        if temperature_step < 0:
            raise ValueError(f"temperature_step must be >= 0, got {temperature_step}")
        if max_temperature > _MAX_TEMPERATURE or temperature_step > _MAX_TEMPERATURE:
            raise ValueError(f"max_temperature and temperature_step must be <= {_MAX_TEMPERATURE:g}, got "
                             f"{max_temperature} and {temperature_step}")
        self.base_temperature = float(base_temperature)
        self.temperature_step = float(temperature_step)
        self.max_temperature = float(max_temperature)
        self.success_threshold = float(success_threshold)
        self.history = history
        self._base_units = _to_units(self.base_temperature)
        self._step_units = _to_units(self.temperature_step)
        self._max_units = _to_units(self.max_temperature)
        if self._base_units <= 0 or (self.temperature_step > 0 and self._step_units == 0):
            raise ValueError(f"temperatures have a resolution of {TEMPERATURE_RESOLUTION}; base_temperature "
                             f"and a nonzero temperature_step must be at least that")
        self._step = 0  # the step stamped on the next update() that is given none
        self._allocate(num_prompts)

    def _allocate(self, num_prompts: int) -> None:
        self._table = np.zeros((num_prompts, 4), dtype=np.int64)
        self._table[:, _TEMP] = self._base_units
        self._table[:, _LAST] = -1
        # float32: 10M prompts x 8 entries is 320 MB; mean rewards need no more precision for logging.
        # Filled now rather than np.zeros' lazy pages, so that no training step pays their first-touch faults.
        self._ring = np.empty((num_prompts, self.history), dtype=np.float32)
        self._ring.fill(0.0)

    @property
    def num_prompts(self) -> int:
        return self._table.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the per-prompt state: 32 + 4 * history bytes per prompt."""
        return self._table.nbytes + self._ring.nbytes

    @property
    def step(self) -> int:
        """The step that the next `update()` without an explicit `step` will record."""
        return self._step

    # ----- the hot path ------------------------------------------------------------------------------

    def temperatures(self, tracker_ids) -> np.ndarray:
        """float32[B]: the sampling temperature of each tracker id."""
        ids = self._as_ids(tracker_ids)
        out = np.empty(ids.shape[0], dtype=np.float64)
        bad = _gather_temperatures(ids, self._table, out)
        if bad >= 0:
            raise self._bad_id_error(tracker_ids, bad)
        return out.astype(np.float32)

    def update(self, tracker_ids, rewards, step: int | None = None) -> GroupStats:
        """Fold one batch of groups (rewards[b] is the group of tracker_ids[b]) into the history."""
        ids = self._as_ids(tracker_ids)
        try:
            rewards = np.ascontiguousarray(rewards, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rewards must be a 2-D array of numbers [batch, group]: {e}") from None
        if rewards.ndim != 2:
            raise ValueError(f"rewards must be 2-D [batch, group], got shape {rewards.shape}")
        if rewards.shape[0] != ids.shape[0]:
            raise ValueError(f"got {ids.shape[0]} tracker ids but {rewards.shape[0]} reward rows")
        if rewards.shape[1] == 0:
            raise ValueError("rewards has an empty group dimension (G == 0); each group needs >= 1 reward")
        if step is None:
            step = self._step
        elif isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            raise ValueError(f"step must be a non-negative integer or None, got {step!r}")
        status, bad_row, *counts = _update_groups(
            ids, rewards, int(step), self.success_threshold, self._step_units, self._base_units,
            self._max_units, self._table, self._ring)
        if status == _BAD_ID:
            raise self._bad_id_error(tracker_ids, bad_row)
        if status == _BAD_REWARD:
            raise ValueError(f"rewards must be finite; row {bad_row} (tracker id {int(ids[bad_row])}) "
                             f"has {rewards[bad_row][~np.isfinite(rewards[bad_row])][0]}")
        # An explicit step moves the counter along, so later implicit steps keep counting from it.
        self._step = int(step) + 1
        return GroupStats(*counts)

    def _as_ids(self, tracker_ids) -> np.ndarray:
        ids = np.asarray(tracker_ids)
        if ids.shape == (0,):  # an empty list arrives as float64; an empty batch is still a valid batch
            return np.empty(0, dtype=np.int64)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"tracker_ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"tracker_ids must be 1-D, got shape {ids.shape}")
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"tracker id {int(ids.max())} is out of range [0, {self.num_prompts})")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _bad_id_error(self, tracker_ids, row: int) -> ValueError:
        bad = int(np.asarray(tracker_ids)[row])
        return ValueError(f"tracker id {bad} (row {row}) is out of range [0, {self.num_prompts})")

    # ----- read-outs ---------------------------------------------------------------------------------

    @property
    def times_seen(self) -> np.ndarray:
        """int64[num_prompts], read-only view: how many groups each prompt has had."""
        return _read_only(self._table[:, _SEEN])

    @property
    def correct_streak(self) -> np.ndarray:
        """int64[num_prompts], read-only view: consecutive all-correct groups up to the latest one."""
        return _read_only(self._table[:, _STREAK])

    @property
    def last_seen_step(self) -> np.ndarray:
        """int64[num_prompts], read-only view: the step each prompt was last updated at (-1 = never)."""
        return _read_only(self._table[:, _LAST])

    def recent_mean_rewards(self, tracker_id: int) -> np.ndarray:
        """float32[<= history]: the prompt's last group mean rewards, oldest first."""
        if isinstance(tracker_id, bool) or not isinstance(tracker_id, Integral):
            raise ValueError(f"tracker_id must be an integer, got {tracker_id!r}")
        if not 0 <= tracker_id < self.num_prompts:
            raise ValueError(f"tracker id {tracker_id} is out of range [0, {self.num_prompts})")
        seen = int(self._table[tracker_id, _SEEN])
        row = self._ring[tracker_id]
        if seen <= self.history:
            return row[:seen].copy()
        start = seen % self.history  # the oldest entry is the next one to be overwritten
        return np.concatenate([row[start:], row[:start]])

    def history_stats(self, tracker_ids, step: int) -> dict[str, float]:
        """What the history says about a batch's prompts before the batch is folded in (step metrics; 0.0 where
        no prompt of the batch was seen before):

        - ``history_reward_mean``: mean over the seen prompts of their recent group mean rewards (the ring);
        - ``correct_streak_max``: the longest all-correct streak a prompt of the batch comes in with;
        - ``steps_since_seen_mean``: mean steps since the seen prompts were last sampled.
        """
        ids = self._as_ids(tracker_ids)
        if ids.size and not (ids.min() >= 0 and ids.max() < self.num_prompts):
            bad = int(np.flatnonzero((ids < 0) | (ids >= self.num_prompts))[0])
            raise self._bad_id_error(tracker_ids, bad)
        rows = self._table[ids]
        seen = rows[:, _SEEN] > 0
        if not seen.any():
            return {"history_reward_mean": 0.0, "correct_streak_max": 0.0, "steps_since_seen_mean": 0.0}
        valid = np.minimum(rows[seen, _SEEN], self.history)  # filled ring slots: the first `valid` ones
        ring = self._ring[ids[seen]].astype(np.float64)
        filled = np.arange(self.history)[None, :] < valid[:, None]
        return {"history_reward_mean": float(((ring * filled).sum(axis=1) / valid).mean()),
                "correct_streak_max": float(rows[:, _STREAK].max()),
                "steps_since_seen_mean": float((step - rows[seen, _LAST]).mean())}

    def temperature_counts(self) -> dict[float, int]:
        """{temperature (float64): number of prompts at it}, over prompts seen at least once. O(num_prompts)."""
        units = self._table[self._table[:, _SEEN] > 0, _TEMP]
        offsets = units - self._base_units
        # Every reachable temperature is base + k*step or max - k*step, so its offset from base is a
        # multiple of g = gcd(step, max - base): a bincount over offsets / g counts them without sorting.
        g = math.gcd(self._step_units, self._max_units - self._base_units) or 1
        num_bins = (self._max_units - self._base_units) // g + 1
        if num_bins <= max(_MAX_HISTOGRAM_BINS, 4 * units.shape[0]):
            counts = np.bincount(offsets // g, minlength=num_bins)
            levels = np.flatnonzero(counts)
            values, counts = self._base_units + levels * g, counts[levels]
        else:  # a step with no common divisor with the span: too many bins, sort instead
            values, counts = np.unique(units, return_counts=True)
        return {v / _UNITS: int(c) for v, c in zip(values.tolist(), counts.tolist())}

    # ----- resizing and checkpoints ------------------------------------------------------------------

    def grow(self, num_prompts: int) -> None:
        """Make room for tracker ids up to num_prompts-1; new prompts start at base, never seen."""
        num_prompts = _check_count("num_prompts", num_prompts, minimum=0)
        if num_prompts < self.num_prompts:
            raise ValueError(f"cannot shrink the tracker from {self.num_prompts} to {num_prompts} prompts")
        old_table, old_ring = self._table, self._ring
        self._allocate(num_prompts)
        self._table[: old_table.shape[0]] = old_table
        self._ring[: old_ring.shape[0]] = old_ring

    def state_dict(self) -> dict:
        """Plain numpy arrays and Python scalars (copies), ready for pickle or a checkpoint."""
        return {
            "num_prompts": self.num_prompts,
            "base_temperature": self.base_temperature,
            "temperature_step": self.temperature_step,
            "max_temperature": self.max_temperature,
            "success_threshold": self.success_threshold,
            "history": self.history,
            "step": self._step,
            # float64 temperatures are readable in a checkpoint and convert back to the units exactly.
            "temperatures": self._table[:, _TEMP] / _UNITS,
            "times_seen": self._table[:, _SEEN].copy(),
            "correct_streak": self._table[:, _STREAK].copy(),
            "last_seen_step": self._table[:, _LAST].copy(),
            "recent_mean_rewards": self._ring.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` exactly; the config and num_prompts must match this tracker's."""
        missing = [k for k in ("num_prompts", "step", *_CONFIG_KEYS, *_ARRAY_KEYS) if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        for key in _CONFIG_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r} but this tracker has {getattr(self, key)!r}")
        n, h = int(state["num_prompts"]), self.history
        if n != self.num_prompts:
            raise ValueError(f"state_dict has {n} prompts but this tracker has {self.num_prompts}; construct it "
                             f"with num_prompts={n} and call grow() after loading")
        arrays = {k: np.asarray(state[k]) for k in _ARRAY_KEYS}
        for key, arr in arrays.items():
            shape = (n, h) if key == "recent_mean_rewards" else (n,)
            kinds = "f" if key in ("temperatures", "recent_mean_rewards") else "iu"
            if arr.shape != shape or arr.dtype.kind not in kinds:
                raise ValueError(f"state_dict[{key!r}] must have shape {shape} and a "
                                 f"{'float' if kinds == 'f' else 'integer'} dtype, got {arr.shape} {arr.dtype}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            raise ValueError(f"state_dict['step'] must be a non-negative integer, got {step!r}")
        if not np.isfinite(arrays["temperatures"]).all():
            raise ValueError("state_dict['temperatures'] holds values this config cannot reach (NaN or inf)")
        units = np.rint(arrays["temperatures"] * _UNITS).astype(np.int64)
        g = math.gcd(self._step_units, self._max_units - self._base_units) or 1
        if ((units < self._base_units) | (units > self._max_units) | ((units - self._base_units) % g != 0)).any():
            raise ValueError("state_dict['temperatures'] holds values this config cannot reach")
        seen, streak, last = arrays["times_seen"], arrays["correct_streak"], arrays["last_seen_step"]
        if (seen < 0).any() or (streak < 0).any() or (streak > seen).any() or ((last == -1) != (seen == 0)).any() \
                or (last < -1).any():
            raise ValueError("state_dict counters are inconsistent (need 0 <= correct_streak <= times_seen, "
                             "and last_seen_step == -1 exactly for unseen prompts)")
        self._table = np.stack([units, seen, streak, last], axis=1).astype(np.int64, copy=False)  # a new array
        self._ring = arrays["recent_mean_rewards"].astype(np.float32)
        self._step = int(step)


def _to_units(value: float) -> int:
    return int(round(value * _UNITS))


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
