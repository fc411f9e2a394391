"""Run logging: one JSON line per step, events, a progress bar with phase times, optional TensorBoard and W&B.

Files in ``output_dir``:

- ``metrics.jsonl``: one JSON object per ``log_step`` call, flushed at once. Non-finite floats (NaN, +-inf)
  are written as ``null`` with the key kept, so every line is strict JSON (``json.loads`` and ``jq`` read it);
  tensors and numpy values become plain numbers or lists.
- ``events.jsonl``: ``log_event`` records, also sent to python logging. Each is one JSON object with ``step``,
  ``time`` (unix seconds), ``kind``, ``message`` and details. The trainer writes the kinds ``nonfinite_loss``
  (update skipped), ``skipped_step`` (no group left to learn from), ``verifier_timeout`` (with ``prompt_id``,
  ``heldout:<id>`` during held-out evaluation, and ``slow``: ``response``, ``gold`` or ``unknown``),
  ``verifier_error`` (the verifier raised; ``prompt_id``, ``error``),
  ``stopped`` (the run stopped on purpose: diverged policy, non-finite losses, failed weight sync) and
  ``interrupted`` (Ctrl-C).
- ``tb/``: TensorBoard scalars when asked for and installed; ``wandb_run_id.txt``: the W&B run id, so that a
  resumed run continues the same W&B run.

Resume: ``start_step > 0`` drops the records with ``step > start_step`` from both files (atomic rewrite), so
after a resume the files hold what an uninterrupted run would have written (wall-clock fields aside).
``start_step == 0`` is a fresh run: both files start empty.

Phase times: ``set_phase(name)`` starts timing ``name``; ``log_step`` adds the seconds each phase took since
the previous ``log_step`` as ``time_<name>_s`` (unless the metrics already hold that key).

Progress: on a terminal, a tqdm bar. When stderr is not a terminal (a log file, CI), a bar would write a
carriage-return update per phase into the log, so a plain line is printed every ``progress_every`` steps
(and at the first and last step) instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erpo_fast.errors import first_line

log = logging.getLogger("erpo_fast")

METRICS_FILENAME = "metrics.jsonl"
EVENTS_FILENAME = "events.jsonl"
WANDB_ID_FILENAME = "wandb_run_id.txt"
TENSORBOARD_DIRNAME = "tb"


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON data; non-finite floats become None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _jsonable(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist(), where)
    if isinstance(value, (np.ndarray, np.generic)):
        return _jsonable(value.tolist(), where)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"metric {where} has type {type(value).__name__}; log numbers, strings, lists or dicts")


def _parse_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file. A truncated last line (a crash mid-write) is dropped with a warning."""
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no trailing newline: the write never finished
                warnings.warn(f"{path}: dropping truncated last line {i + 1}", stacklevel=3)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file, or of ``<path>/metrics.jsonl`` when ``path`` is a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return _parse_jsonl(path)


def _keep_up_to_step(path: Path, start_step: int) -> None:
    """Atomically rewrite ``path`` without the records after ``start_step`` (those of the interrupted run)."""
    if not path.is_file():
        return
    kept = [r for r in _parse_jsonl(path) if not isinstance(r.get("step"), int) or r["step"] <= start_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLogger:
    """Writes ``metrics.jsonl``/``events.jsonl``; drives the progress bar and the optional TensorBoard/W&B.

    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, output_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "erpo-fast", config: dict | None = None, progress_every: int = 10):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
            raise ValueError(f"total_steps must be a non-negative integer, got {total_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILENAME
        self.events_path = self.output_dir / EVENTS_FILENAME
        self.step = start_step  # the last step logged
        for path in (self.metrics_path, self.events_path):
            if start_step > 0:
                _keep_up_to_step(path, start_step)
            else:
                path.unlink(missing_ok=True)
        # Held open for the whole run (closed by close()); each line is flushed as it is written.
        self._metrics_file = open(self.metrics_path, "a")  # noqa: SIM115
        self._events_file = open(self.events_path, "a")  # noqa: SIM115
        self._phase: str | None = None
        self._phase_start = 0.0
        self._phase_times: dict[str, float] = {}
        self._closed = False

        from tqdm import tqdm

        tty = progress and _is_tty(sys.stderr)
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not tty, file=sys.stderr,
                         dynamic_ncols=True, unit="step")
        self._lines = progress and not tty and progress_every > 0
        self._lines_every = progress_every
        self._total = total_steps
        self._first_logged = True
        self._started = time.perf_counter()
        self._start_step = start_step
        self._tb = self._open_tensorboard(start_step) if tensorboard else None
        self._wandb = self._open_wandb(wandb_project, config, start_step) if wandb else None

    # -- optional sinks ------------------------------------------------------------------------------------

    def _open_tensorboard(self, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("TensorBoard logging was asked for but tensorboard is not installed "
                        "(pip install tensorboard); skipping it")
            return None
        # purge_step drops the interrupted run's events past the checkpoint, as for metrics.jsonl.
        return SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIRNAME),
                             purge_step=start_step + 1 if start_step > 0 else None)

    def _open_wandb(self, project: str, config: dict | None, start_step: int):
        try:
            import wandb
        except ImportError:
            log.warning("W&B logging was asked for but wandb is not installed (pip install wandb); "
                        "skipping it")
            return None
        id_path = self.output_dir / WANDB_ID_FILENAME
        try:
            resuming = start_step > 0 and id_path.is_file()
            run_id = id_path.read_text().strip() if resuming else wandb.util.generate_id()
            run = wandb.init(project=project, config=config, dir=str(self.output_dir), id=run_id,
                             resume="allow")
            id_path.write_text(run_id)
            return run
        except Exception as e:  # network, auth, anything: the run must go on without W&B
            log.warning("W&B init failed (%s); continuing without W&B", first_line(e))
            return None

    def _send(self, step: int, record: dict) -> None:
        scalars = {k: v for k, v in _flatten(record) if k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(scalars, step=step)
            except Exception as e:
                log.warning("W&B log failed (%s); continuing without W&B", first_line(e))
                self._wandb = None

    # -- public API ----------------------------------------------------------------------------------------

    def set_phase(self, name: str) -> None:
        """Start timing phase ``name`` ("rollout", "score", "learn", "sync"...); shown on the progress bar."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty string, got {name!r}")
        self._end_phase()
        self._phase, self._phase_start = name, time.perf_counter()
        self._bar.set_description_str(name)

    def _end_phase(self) -> None:
        if self._phase is not None:
            elapsed = time.perf_counter() - self._phase_start
            self._phase_times[self._phase] = self._phase_times.get(self._phase, 0.0) + elapsed
            self._phase = None

    def log_step(self, metrics: dict) -> dict:
        """Write one record (``metrics`` must hold an integer ``step``); returns the record as written."""
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
        step = metrics.get("step")
        if isinstance(step, (np.integer, torch.Tensor)):
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"metrics need an integer 'step', got {step!r}")
        self._end_phase()
        times, self._phase_times = self._phase_times, {}
        record = {"step": step}
        record.update(_jsonable({k: v for k, v in metrics.items() if k != "step"}, "metrics"))
        for name, seconds in times.items():
            record.setdefault(f"time_{name}_s", round(seconds, 6))
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        self._send(step, record)
        self.step = step
        self._bar.update(max(0, step - self._bar.n))
        self._bar.set_postfix_str(_postfix(record, times), refresh=True)
        if self._lines and (self._first_logged or step % self._lines_every == 0 or step == self._total):
            self._print_line(step, record, times)
        self._first_logged = False
        return record

    def _print_line(self, step: int, record: dict, times: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self._started
        done = step - self._start_step
        eta = elapsed / done * (self._total - step) if done > 0 and self._total >= step else None
        pct = 100.0 * step / self._total if self._total else 100.0
        line = f"step {step}/{self._total} ({pct:.0f}%) {_postfix(record, times)} elapsed {_hms(elapsed)}"
        if eta is not None:
            line += f" eta {_hms(eta)}"
        print(line, file=sys.stderr, flush=True)

    def log_event(self, kind: str, message: str, *, step: int | None = None, level: int = logging.WARNING,
                  **fields) -> dict:
        """Append an event to ``events.jsonl`` and python logging. ``step`` defaults to the step in progress
        (the last logged step + 1); ``fields`` are extra JSON-able details."""
        step = self.step + 1 if step is None else int(step)
        record = {"step": step, "time": round(time.time(), 3), "kind": str(kind), "message": str(message)}
        record.update(_jsonable(fields, "event"))
        self._events_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._events_file.flush()
        details = "".join(f" {k}={v}" for k, v in record.items()
                          if k not in ("step", "time", "kind", "message"))
        log.log(level, "[%s] step %d: %s%s", kind, step, message, details)
        return record

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        self._metrics_file.close()
        self._events_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:
                log.warning("W&B finish failed (%s)", first_line(e))

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(record: dict, prefix: str = ""):
    """(name, value) for every finite numeric leaf; nested dicts give "a/b" names, lists are skipped."""
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, name + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield name, v


def _postfix(record: dict, times: dict[str, float]) -> str:
    parts = []
    reward = record.get("reward_mean")
    if isinstance(reward, (int, float)):
        parts.append(f"reward={reward:.3f}")
    parts += [f"{name} {seconds:.2f}s" for name, seconds in times.items()]
    return " ".join(parts)


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress of a long loop outside the step loop (the warm start): a tqdm bar on a terminal, else a
    plain line about every tenth of the way. ``update(n=1, postfix="")``, ``close()``."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.desc, self.n = total, desc, 0
        tty = enabled and _is_tty(sys.stderr)
        self._bar = tqdm(total=total, desc=desc, disable=not tty, file=sys.stderr, dynamic_ncols=True,
                         leave=False)
        self._lines = enabled and not tty
        self._every = max(1, total // 10)
        self._started = time.perf_counter()

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.n += n
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix_str(postfix, refresh=False)
        if self._lines and (self.n % self._every < n or self.n == self.total):
            elapsed = time.perf_counter() - self._started
            eta = elapsed / self.n * (self.total - self.n)
            print(f"{self.desc}: {self.n}/{self.total} {postfix} elapsed {_hms(elapsed)} eta {_hms(eta)}".replace(
                "  ", " "), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
