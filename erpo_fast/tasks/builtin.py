"""The built-in task a run uses (data.task, data.task_levels): its splits, warm-start examples and verifier."""

from __future__ import annotations

from erpo_fast.config import ConfigError, DataConfig
from erpo_fast.tasks import arithmetic, digits

TASKS = {"arithmetic": arithmetic, "digits": digits}
REWARDS = {"arithmetic": "arithmetic", "digits": "erpo_fast.tasks.digits:digits_reward"}


def levels(data_cfg: DataConfig) -> tuple[int, ...]:
    """data.task_levels parsed ("2,3,4" -> (2, 3, 4)), or the task's default levels."""
    module = TASKS[data_cfg.task]
    if data_cfg.task_levels is None:
        return tuple(module.DEFAULT_LEVELS)
    try:
        out = tuple(int(part) for part in data_cfg.task_levels.split(","))
    except ValueError:
        raise ConfigError(f"data.task_levels={data_cfg.task_levels!r}: expected comma-separated integers, "
                          "e.g. 2,3,4") from None
    known = sorted(module.LEVELS)
    if not out or len(set(out)) != len(out) or not set(out) <= set(known):
        raise ConfigError(f"data.task_levels={data_cfg.task_levels!r}: distinct levels of the {data_cfg.task} "
                          f"task, from {known}")
    return out


def splits(data_cfg: DataConfig, num_warm_start: int = 0):
    """(train, held-out) problems, plus with num_warm_start > 0 that many warm-start problems disjoint from both."""
    module = TASKS[data_cfg.task]
    kwargs = dict(seed=data_cfg.seed, num_train=data_cfg.num_train, num_heldout=data_cfg.num_heldout,
                  levels=levels(data_cfg))
    try:
        if data_cfg.task == "digits":
            return module.make_splits(num_warm_start=num_warm_start, **kwargs)
        train, heldout = module.make_splits(**kwargs)
        if not num_warm_start:
            return train, heldout
        # The arithmetic task's warm-start examples: the problems a larger train split would add.
        rl_ids = {p.id for p in train}
        pool, _ = module.make_splits(**{**kwargs, "num_train": data_cfg.num_train + num_warm_start})
        return train, heldout, [p for p in pool if p.id not in rl_ids][:num_warm_start]
    except ValueError as e:  # e.g. more prompts asked for than the chosen levels hold
        raise ConfigError(f"built-in task {data_cfg.task}: {e}") from None


def reward_name(data_cfg: DataConfig) -> str:
    return REWARDS[data_cfg.task]
