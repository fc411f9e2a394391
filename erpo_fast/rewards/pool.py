"""Score (response, answer) pairs with a verifier in worker processes, with a timeout per response.

Verifiers are third-party code (sympy inside math-verify) that can hang on adversarial model output, so
each response gets `timeout_s` seconds. A response that runs over scores 0, is counted and logged, and
the worker busy with it is killed and replaced, so one bad response never stalls the training step.
A verifier that raises (or returns a non-finite value, or kills its process) likewise scores 0, is
counted as an error and logged.

Workers are started with `forkserver` where the platform has it, else `spawn`: forking the trainer
itself after torch has started its threads is unsafe. The start-up cost (a fresh interpreter importing
the verifier's module and the main module) is paid once, in the background, when the pool is built; a
replacement after a timeout pays it again while the other workers keep scoring. `fn` must therefore be
a module-level function (picklable by reference), as `get_reward_fn` returns.

`num_workers=0` scores in the calling process: no start-up cost, but no timeout can be enforced.

Each worker takes a chunk of items at a time (fewer pipe round trips); the parent times the item at
the head of each worker's chunk from the moment the previous one came back, which never overstates the
time the verifier has really spent on it.

Blame for a timeout. A verifier may carry a `prepare_answer(answer)` attribute: the part of the work
that depends on the gold answer alone (math-verify parsing the gold LaTeX). A worker runs it once per
distinct gold answer, and tells the parent when it starts and ends, so a timeout is reported with
`slow="gold"` (the dataset's answer is at fault) or `slow="response"`; a verifier without
`prepare_answer` gives `slow="unknown"`. A gold answer that timed out once is remembered: the other
responses to it score 0 at once, instead of each costing another `timeout_s`.

Every timeout and error is also an incident in `last_stats.incidents` (with the item's key, e.g. its
prompt id, when `score(pairs, keys=...)` is given), and goes to `on_event(kind, message, **details)`
when that is set (the trainer points it at the run's events.jsonl). Only the first few of one call are shown
at WARNING (the rest at DEBUG, all still in events.jsonl), then one line counting the others: a verifier that
fails often must not bury the run's output.

Occasional failures are the verifier's business (a response it cannot parse); a call in which *every*
response failed means the verifier itself is broken. ``check_not_all_failed`` turns that into a
RewardFunctionError naming the function and the first error (the trainer stops with exit code 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from erpo_fast.errors import RewardFunctionError

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]

_MAX_CHUNK = 32
_MAX_LOGGED_CHARS = 80
_MAX_SLOW_GOLD = 10_000  # gold answers remembered as timing out
_SHOWN_INCIDENTS = 3  # incidents of one score() call logged at WARNING; the rest at DEBUG


@dataclass
class RewardStats:
    """Counts for one `RewardPool.score` call (or, in `RewardPool.total_stats`, summed over all calls)."""

    num_scored: int = 0
    num_timeouts: int = 0
    num_errors: int = 0
    num_restarts: int = 0  # workers replaced after a timeout or a crash
    elapsed_s: float = 0.0
    # Timeouts and errors of one score() call: {"kind", "index", "prompt_id", "slow" | "error", "response"}
    # (not summed into total_stats).
    incidents: list = field(default_factory=list)

    @property
    def num_failed(self) -> int:
        return self.num_timeouts + self.num_errors

    def first_failure(self) -> str | None:
        """The first incident of the call, in words (None when there was none)."""
        if not self.incidents:
            return None
        inc = self.incidents[0]
        if inc["kind"] == "verifier_timeout":
            return f"timed out after {inc['timeout_s']:g} s"
        return inc["error"]

    def add(self, other: RewardStats) -> None:
        self.num_scored += other.num_scored
        self.num_timeouts += other.num_timeouts
        self.num_errors += other.num_errors
        self.num_restarts += other.num_restarts
        self.elapsed_s += other.elapsed_s


def _call_verifier(fn: RewardFn, response: str, answer: str) -> float:
    value = float(fn(response, answer))
    if not math.isfinite(value):
        raise ValueError(f"verifier returned a non-finite reward ({value})")
    return value


def _short(text: object) -> str:
    text = repr(text)
    return text if len(text) <= _MAX_LOGGED_CHARS else text[:_MAX_LOGGED_CHARS] + "..."


def _worker_main(fn: RewardFn, conn) -> None:
    # Ctrl-C reaches the whole process group; the parent owns shutdown, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prepare = getattr(fn, "prepare_answer", None)
    prepared: set[str] = set()
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, response, answer in chunk:
            try:
                if prepare is not None and answer not in prepared:
                    conn.send(("gold", index))  # from here until "response", a hang is the gold answer's
                    try:
                        prepare(answer)
                    finally:
                        conn.send(("response", index))
                    if len(prepared) > _MAX_SLOW_GOLD:
                        prepared.clear()
                    prepared.add(answer)
                conn.send((index, True, _call_verifier(fn, response, answer)))
            except Exception as exc:  # any verifier failure is that response's error, never the worker's
                conn.send((index, False, f"{type(exc).__name__}: {str(exc)[:200]}"))


class _Worker:
    """One worker process, its pipe, and the items sent to it that have not come back yet (in order)."""

    def __init__(self, context, fn: RewardFn):
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(fn, child_conn), daemon=True,
                                       name="erpo-reward-worker")
        self.process.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        self.started_at = time.monotonic()
        self.ready = False
        self.pending: deque[int] = deque()
        self.head_since = 0.0  # when the item at pending[0] started (at the latest)
        self.on_gold = False  # the head item is in the verifier's prepare_answer (gold answer) stage

    def stop(self, *, graceful: bool) -> None:
        if graceful and self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):  # already gone: nothing to tell it
                self.conn.send(None)
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.conn.close()


def check_not_all_failed(name: str, scored: int, failed: int, first_failure: str | None, where: str) -> None:
    """Raise RewardFunctionError when every one of ``scored`` (> 0) responses failed verification."""
    if scored and failed >= scored:
        raise RewardFunctionError(f"{where}: the reward function {name} failed on every response ({failed} of "
                                  f"{scored}), first error: {first_failure}")


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class RewardPool:
    """Scores `(response, answer)` pairs with `fn` in `num_workers` processes, `timeout_s` per response.

    Use as a context manager (or call `close()`). `score()` returns the rewards in input order and leaves
    its counts in `last_stats`; `total_stats` sums them over the pool's life.
    """

    def __init__(self, fn: RewardFn, num_workers: int = 2, timeout_s: float = 5.0, *,
                 start_method: str | None = None, startup_timeout_s: float = 120.0, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        self.fn = fn
        # How errors name the verifier: the user's spec (data.reward) when given, else the function's own name.
        self.name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.has_gold_stage = getattr(fn, "prepare_answer", None) is not None
        self.on_event: Callable[..., object] | None = None  # e.g. RunLogger.log_event
        self._slow_gold: set[str] = set()
        self._keys: list | None = None
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.last_stats = RewardStats()
        self.total_stats = RewardStats()
        self._closed = False
        self._workers: list[_Worker] = []
        if num_workers == 0:
            return
        try:
            pickle.dumps(fn)
        except Exception as exc:
            raise ValueError(f"fn must be a module-level function so that worker processes can import it "
                             f"(lambdas and nested functions cannot be sent): {exc}") from None
        method = start_method or _default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method {method!r} is not available here; choose from "
                             f"{multiprocessing.get_all_start_methods()}")
        self._context = multiprocessing.get_context(method)
        # Started now, so that their start-up overlaps whatever the caller does before the first score().
        self._workers = [_Worker(self._context, fn) for _ in range(num_workers)]

    # -- public API -----------------------------------------------------------------------------------

    def score(self, pairs: Iterable[tuple[str, str]], keys: Iterable[object] | None = None) -> list[float]:
        """Rewards for `pairs`, in order; a timed-out or failed verification scores 0.0. `keys` (one per
        pair, e.g. the prompt id) label the incidents reported for them."""
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"pairs[{i}] must be a (response, answer) pair, got {_short(pair)}")
        keys = list(keys) if keys is not None else None
        if keys is not None and len(keys) != len(pairs):
            raise ValueError(f"keys has {len(keys)} entries for {len(pairs)} pairs")
        self._keys = keys
        stats = RewardStats(num_scored=len(pairs))
        rewards = [0.0] * len(pairs)
        start = time.monotonic()
        if self.num_workers == 0:
            self._score_in_process(pairs, rewards, stats)
        elif pairs:
            self._score_in_workers(pairs, rewards, stats)
        stats.elapsed_s = time.monotonic() - start
        self.last_stats = stats
        self.total_stats.add(stats)
        self._report(stats)
        return rewards

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop(graceful=True)
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------

    def _score_in_process(self, pairs, rewards, stats) -> None:
        for index, (response, answer) in enumerate(pairs):
            try:
                rewards[index] = _call_verifier(self.fn, response, answer)
            except Exception as exc:
                self._record_error(stats, index, pairs, f"{type(exc).__name__}: {exc}")

    def _key(self, index: int):
        return self._keys[index] if self._keys is not None else None

    def _record_error(self, stats, index, pairs, message) -> None:
        stats.num_errors += 1
        stats.incidents.append({"kind": "verifier_error", "index": index, "prompt_id": self._key(index),
                                "error": message, "response": _short(pairs[index][0])})

    def _record_timeout(self, stats, index, pairs, slow: str, *, known: bool = False) -> None:
        stats.num_timeouts += 1
        incident = {"kind": "verifier_timeout", "index": index, "prompt_id": self._key(index), "slow": slow,
                    "timeout_s": self.timeout_s}
        if slow == "gold":
            incident["answer"] = _short(pairs[index][1])
            if known:
                incident["known_slow_gold"] = True  # not run again: this gold answer timed out before
        else:
            incident["response"] = _short(pairs[index][0])
        stats.incidents.append(incident)

    def _report(self, stats: RewardStats) -> None:
        for shown, inc in enumerate(stats.incidents):
            details = {k: v for k, v in inc.items() if k != "kind"}
            where = f"prompt {inc['prompt_id']}" if inc["prompt_id"] is not None else f"item {inc['index']}"
            if inc["kind"] == "verifier_timeout":
                blame = {"gold": "the gold answer " + inc.get("answer", ""), "response": "the response",
                         "unknown": "the verifier"}[inc["slow"]]
                message = (f"verification of {where} timed out after {self.timeout_s:g} s ({blame} was slow); "
                           "scored 0")
            else:
                message = f"verification of {where} failed ({inc['error']}); scored 0"
            level = logging.WARNING if shown < _SHOWN_INCIDENTS else logging.DEBUG
            if self.on_event is not None:
                self.on_event(inc["kind"], message, level=level, **details)
            else:
                logger.log(level, "%s (%s)", message, ", ".join(f"{k}={v}" for k, v in details.items()))
        hidden = len(stats.incidents) - _SHOWN_INCIDENTS
        if hidden > 0:
            where = " (all in events.jsonl)" if self.on_event is not None else ""
            logger.warning("%d more verification failures in this batch of %d%s", hidden, stats.num_scored, where)

    def _replace(self, slot: int, stats: RewardStats) -> None:
        self._workers[slot].stop(graceful=False)
        self._workers[slot] = _Worker(self._context, self.fn)
        stats.num_restarts += 1

    def _score_in_workers(self, pairs, rewards, stats) -> None:
        for slot, worker in enumerate(self._workers):
            if worker.pending:  # left by an interrupted call: its late answers must not leak into this one
                self._replace(slot, stats)
        queue = deque()
        for i in range(len(pairs)):
            if pairs[i][1] in self._slow_gold:
                self._record_timeout(stats, i, pairs, "gold", known=True)
            else:
                queue.append(i)
        # Small enough chunks that every worker gets several (load balance), large enough to amortise IPC.
        chunk = max(1, min(_MAX_CHUNK, len(pairs) // (4 * self.num_workers)))
        while queue or any(w.pending for w in self._workers):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and not worker.pending and queue:
                    items = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                    # A gold answer found slow while these waited: do not spend another timeout on it.
                    for i in [i for i in items if pairs[i][1] in self._slow_gold]:
                        items.remove(i)
                        self._record_timeout(stats, i, pairs, "gold", known=True)
                    if not items:
                        continue
                    try:
                        worker.conn.send([(i, pairs[i][0], pairs[i][1]) for i in items])
                    except (OSError, ValueError):
                        # Died while idle: nothing of ours was running on it, so nobody is charged.
                        queue.extendleft(reversed(items))
                        self._replace(slot, stats)
                        continue
                    worker.pending.extend(items)
                    worker.head_since = now

            deadlines = [w.head_since + self.timeout_s for w in self._workers if w.pending]
            deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
            if not deadlines:
                continue  # the rest of the queue was skipped (known slow gold answers): nothing to wait for
            watched = [w.conn for w in self._workers if w.pending or not w.ready]
            wait(watched, timeout=max(0.0, min(deadlines) - time.monotonic()))

            for slot in range(len(self._workers)):
                self._drain(slot, pairs, rewards, stats, queue)

            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.pending and now - worker.head_since > self.timeout_s:
                    index = worker.pending.popleft()
                    slow = "gold" if worker.on_gold else "response" if self.has_gold_stage else "unknown"
                    if slow == "gold":
                        if len(self._slow_gold) >= _MAX_SLOW_GOLD:
                            self._slow_gold.clear()
                        self._slow_gold.add(pairs[index][1])
                    self._record_timeout(stats, index, pairs, slow)
                    queue.extendleft(reversed(worker.pending))
                    self._replace(slot, stats)
                elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                    self.close()
                    raise RuntimeError(f"a reward worker did not start within {self.startup_timeout_s:.0f} s")

    def _drain(self, slot, pairs, rewards, stats, queue) -> None:
        """Read every message waiting from one worker; replace it if it died."""
        worker = self._workers[slot]
        while True:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            if message == ("ready",):
                worker.ready = True
                continue
            if message[0] in ("gold", "response"):
                worker.on_gold = message[0] == "gold"
                continue
            index, ok, value = message
            worker.pending.popleft()  # answers come back in the order the items were sent
            worker.head_since = time.monotonic()
            worker.on_gold = False
            if ok:
                rewards[index] = value
            else:
                self._record_error(stats, index, pairs, value)
        # The worker's pipe closed: the process died (killed by the OS, os._exit in the verifier, ...).
        worker.process.join(timeout=5.0)
        code = worker.process.exitcode
        if not worker.ready:
            self.close()
            raise RuntimeError(f"a reward worker exited during start-up (exit code {code}); the verifier "
                               f"must be importable in a fresh process")
        if worker.pending:
            index = worker.pending.popleft()
            self._record_error(stats, index, pairs, f"worker process died (exit code {code})")
            queue.extendleft(reversed(worker.pending))
        self._replace(slot, stats)
