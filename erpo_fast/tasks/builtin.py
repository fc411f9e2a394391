"""The built-in task a run uses (data.task, data.task_levels): its splits, warm-start examples and verifier."""

from __future__ import annotations

from erpo_fast.config import ConfigError, DataConfig
from erpo_fast.tasks import Task, get_task


def levels(data_cfg: DataConfig) -> tuple[int, ...]:
    """data.task_levels parsed ("2,3,4" -> (2, 3, 4)), or the task's default levels."""
    task: Task = get_task(data_cfg.task)
    if data_cfg.task_levels is None:
        return tuple(task.DEFAULT_LEVELS)
    try:
        out = tuple(int(part) for part in data_cfg.task_levels.split(","))
    except ValueError:
        raise ConfigError(f"data.task_levels={data_cfg.task_levels!r}: expected comma-separated integers, "
                          "e.g. 2,3,4") from None
    known = sorted(task.LEVELS)
    if not out or len(set(out)) != len(out) or not set(out) <= set(known):
        raise ConfigError(f"data.task_levels={data_cfg.task_levels!r}: distinct levels of the {data_cfg.task} "
                          f"task, from {known}")
    return out


def splits(data_cfg: DataConfig, num_warm_start: int = 0):
    """(train, held-out) problems, plus with num_warm_start > 0 that many warm-start problems disjoint from both."""
    try:
        return get_task(data_cfg.task).make_splits(seed=data_cfg.seed, num_train=data_cfg.num_train,
                                                    num_heldout=data_cfg.num_heldout, levels=levels(data_cfg),
                                                    num_warm_start=num_warm_start)
    except ValueError as e:  # e.g. more prompts asked for than the chosen levels hold
        raise ConfigError(f"built-in task {data_cfg.task}: {e}") from None


def reward_name(data_cfg: DataConfig) -> str:
    """The task's verifier, as `data.reward` names it (see erpo_fast.rewards.get_reward_fn)."""
    return data_cfg.task
