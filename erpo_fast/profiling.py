"""``--trainer.profile_steps A:B``: a torch.profiler trace of training steps A..B, as users profile throughput.

While steps A..B (inclusive, 1-based like the loop's step numbers) run, ``torch.profiler`` records CPU
operators (and CUDA kernels on a GPU). The session's phases are marked as named ranges in the trace
(``erpo/rollout``, ``erpo/score``, ``erpo/learn``, ``erpo/sync``), so a viewer shows where each step's time
goes. After step B:

- the Chrome trace goes to ``<output_dir>/profile/trace_steps_A-B.json`` (``..._rankN.json`` under torchrun):
  open it in Perfetto (ui.perfetto.dev) or chrome://tracing; TensorBoard's profiler plugin reads it as well;
- the main rank prints a per-phase table (wall seconds per step, share of the step) and the operators with
  the most self time (CPU, and CUDA on a GPU), also saved as ``summary_steps_A-B.txt`` beside the trace.

Phase times are taken around the session's own calls (engine.generate, rewards.score, learner.train_on,
engine.update_weights), with a device synchronise on CUDA, so the table is wall time, not kernel time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from pathlib import Path

import torch
from torch.autograd.profiler_util import EventList

from erpo_fast.config import ConfigError

__all__ = ["PHASES", "StepProfiler", "parse_profile_steps"]

log = logging.getLogger("erpo_fast")

# Phase name -> (session attribute, method) whose calls make up that phase.
PHASES = {"rollout": ("rollout.engine", "generate"), "score": ("rollout.rewards", "score"),
          "learn": ("learner", "train_on"), "sync": ("rollout.engine", "update_weights")}
TOP_OPERATORS = 15


def parse_profile_steps(spec: str | None, max_steps: int | None = None) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)`` with ``1 <= A <= B`` (``"A"`` alone means ``A:A``); None -> None."""
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip()
    parts = text.split(":")
    try:
        if len(parts) == 1:
            first = last = int(parts[0])
        elif len(parts) == 2:
            first, last = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"trainer.profile_steps must be 'A:B' (first and last step, e.g. 3:5), got {text!r}"
                          ) from None
    if not 1 <= first <= last:
        raise ConfigError(f"trainer.profile_steps {text!r}: need 1 <= A <= B (steps are numbered from 1)")
    if max_steps is not None and last > max_steps:
        raise ConfigError(f"trainer.profile_steps {text!r} ends after trainer.max_steps={max_steps}")
    return first, last


class StepProfiler:
    """Records steps ``first..last``; ``step(n)`` is a context manager around each training step."""

    def __init__(self, spec: str | None, output_dir: str | Path, *, max_steps: int | None = None, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", stream=None):
        self.range = parse_profile_steps(spec, max_steps)
        self.output_dir = Path(output_dir) / "profile"
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.stream = stream if stream is not None else sys.stderr
        self._prof = None
        self._phase_s: dict[str, float] = {}
        self._step_s = 0.0
        self._steps = 0
        self._restore: list[tuple[object, str, object]] = []
        self.trace_path: Path | None = None
        self.summary: str | None = None

    @property
    def enabled(self) -> bool:
        return self.range is not None

    def attach(self, session) -> None:
        """Mark the session's phases: wrap its phase methods (timed and named only while recording)."""
        if not self.enabled:
            return
        if self.range[1] <= getattr(session, "start_step", 0):
            log.warning("trainer.profile_steps %d:%d: the run resumes after step %d, so nothing will be profiled",
                        *self.range, session.start_step)
        for phase, (attr, method) in PHASES.items():
            owner = session
            for name in attr.split("."):
                owner = getattr(owner, name, None)
            fn = getattr(owner, method, None)
            if fn is None:
                continue
            self._restore.append((owner, method, owner.__dict__.get(method)))
            setattr(owner, method, self._wrap(phase, fn))

    def detach(self) -> None:
        for owner, method, previous in reversed(self._restore):
            if previous is None:
                with contextlib.suppress(AttributeError):
                    delattr(owner, method)
            else:
                setattr(owner, method, previous)
        self._restore.clear()

    def _wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._prof is None:
                return fn(*args, **kwargs)
            self._sync()
            t0 = time.perf_counter()
            with torch.profiler.record_function(f"erpo/{phase}"):
                out = fn(*args, **kwargs)
                self._sync()
            self._phase_s[phase] = self._phase_s.get(phase, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def step(self, step: int):
        if not self.enabled or not self.range[0] <= step <= self.range[1]:
            yield
            return
        if self._prof is None:
            self._start()
        self._sync()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"erpo/step_{step}"):
            yield
        self._sync()
        self._step_s += time.perf_counter() - t0
        self._steps += 1
        if step == self.range[1]:
            self._finish()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, record_shapes=True, with_stack=False)
        self._prof.__enter__()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        first, last = self.range
        suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.output_dir / f"trace_steps_{first}-{last}{suffix}.json"
        prof.export_chrome_trace(str(self.trace_path))
        self.summary = self._format(prof)
        (self.output_dir / f"summary_steps_{first}-{last}{suffix}.txt").write_text(self.summary + "\n")
        if self.rank == 0:
            print(self.summary, file=self.stream, flush=True)
        self.detach()

    def _format(self, prof) -> str:
        first, last = self.range
        n = max(self._steps, 1)
        step_s = self._step_s / n
        lines = [f"=== profile of steps {first}..{last} ({self._steps} step(s), {self.device.type}) ===",
                 f"{'phase':<10}{'s/step':>10}{'share':>9}"]
        for phase in (*PHASES, "other"):
            if phase == "other":
                secs = max(0.0, step_s - sum(self._phase_s.values()) / n)
            else:
                secs = self._phase_s.get(phase, 0.0) / n
            lines.append(f"{phase:<10}{secs:>10.3f}{secs / step_s if step_s > 0 else 0.0:>9.1%}")
        lines.append(f"{'step':<10}{step_s:>10.3f}{1.0:>9.1%}")
        # Operators only: our erpo/* ranges are the phase table's business.
        averages = EventList([e for e in prof.key_averages() if not e.key.startswith("erpo/")],
                             use_device="cuda" if self.device.type == "cuda" else None)
        lines.append(f"\ntop {TOP_OPERATORS} operators by self CPU time:")
        lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS))
        if self.device.type == "cuda":
            lines.append(f"top {TOP_OPERATORS} operators by self CUDA time:")
            lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=TOP_OPERATORS))
        lines.append(f"Chrome trace: {self.trace_path} (open in ui.perfetto.dev or chrome://tracing)")
        return "\n".join(lines)
