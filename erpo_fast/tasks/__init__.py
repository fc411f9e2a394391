"""Built-in synthetic tasks: offline, seeded, with exactly checkable answers (see `arithmetic`)."""

from __future__ import annotations

from erpo_fast.tasks.arithmetic import DEFAULT_LEVELS, LEVELS, Problem, level_size, make_splits

__all__ = ["DEFAULT_LEVELS", "LEVELS", "Problem", "level_size", "make_splits"]
