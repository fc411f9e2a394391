"""The built-in task a run uses (builtin.task, builtin.levels): its splits, warm-start examples and verifier."""

from __future__ import annotations

from erpo_fast.config import BuiltinConfig, ConfigError
from erpo_fast.tasks import Task, get_task


def levels(b: BuiltinConfig) -> tuple[int, ...]:
    """builtin.levels parsed ("2,3,4" -> (2, 3, 4)), or the task's default levels."""
    task: Task = get_task(b.task)
    if b.levels is None:
        return tuple(task.DEFAULT_LEVELS)
    try:
        out = tuple(int(part) for part in b.levels.split(","))
    except ValueError:
        raise ConfigError(f"builtin.levels={b.levels!r}: expected comma-separated integers, e.g. 2,3,4") from None
    known = sorted(task.LEVELS)
    if not out or len(set(out)) != len(out) or not set(out) <= set(known):
        raise ConfigError(f"builtin.levels={b.levels!r}: distinct levels of the {b.task} task, from {known}")
    return out


def splits(b: BuiltinConfig, num_warm_start: int = 0):
    """(train, held-out) problems, plus with num_warm_start > 0 that many warm-start problems disjoint from both."""
    try:
        return get_task(b.task).make_splits(seed=b.seed, num_train=b.num_train, num_heldout=b.num_heldout,
                                            levels=levels(b), num_warm_start=num_warm_start)
    except ValueError as e:  # e.g. more prompts asked for than the chosen levels hold
        raise ConfigError(f"built-in task {b.task}: {e}") from None


def reward_name(b: BuiltinConfig) -> str:
    """The task's verifier, as `data.reward` names it (see erpo_fast.rewards.get_reward_fn)."""
    return b.task
