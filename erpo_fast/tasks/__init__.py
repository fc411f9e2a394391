"""Built-in synthetic tasks: offline, seeded, with exactly checkable answers.

Each is one module here that follows `Task`, named in `erpo_fast.choices.TASKS` (which the config offers as
builtin.task and `erpo_fast.rewards` as a verifier name): adding a task is adding its module and its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol


class Task(Protocol):
    """A built-in task module. Its problems carry ``id``, ``prompt``, ``answer``, ``solution`` (the worked
    solution the warm start trains on, ending in the answer) and ``level``."""

    LEVELS: Sequence[int]  # every level the task can draw from
    DEFAULT_LEVELS: Sequence[int]  # the levels a run uses without builtin.levels

    def make_splits(self, seed: int, num_train: int, num_heldout: int, levels: Sequence[int],
                    num_warm_start: int = 0) -> tuple[list, ...]:
        """(train, held-out) problems, disjoint and deterministic in ``seed``; with ``num_warm_start`` > 0 a
        third list of warm-start problems, disjoint from both."""
        ...

    def reward(self, response: str, answer: str) -> float:
        """The verifier: 1.0 for a correct response to a problem whose answer is ``answer``, else 0.0."""
        ...


def get_task(name: str) -> Task:
    from erpo_fast.choices import TASKS

    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"erpo_fast.tasks.{name}")


__all__ = ["Task", "get_task"]
