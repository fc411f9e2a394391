"""Reward verifiers: math-verify for math, the built-in tasks' exact checkers (each in its task's module), user
functions (`module:function`, `path/file.py:function`), and a timeout-enforcing pool.

Verifier modules are imported on demand, so that importing the pool does not pull in sympy.
"""

from __future__ import annotations

import importlib

from erpo_fast.choices import TASKS
from erpo_fast.rewards.pool import RewardFn, RewardPool, RewardStats

REWARD_NAMES = (*TASKS, "math")

__all__ = ["REWARD_NAMES", "RewardFn", "RewardPool", "RewardStats", "get_reward_fn"]


def get_reward_fn(name: str) -> RewardFn:
    """The verifier `fn(response, answer) -> float` called `name`: a built-in task's ("arithmetic", "digits"),
    "math", or a custom one as "module:function" / "path/file.py:function" (raises RewardSpecError, a
    ConfigError, if it cannot be loaded; see erpo_fast.rewards.custom)."""
    if ":" in name:
        from erpo_fast.rewards.custom import CustomReward

        return CustomReward(name)
    if name in TASKS:
        return importlib.import_module(f"erpo_fast.tasks.{name}").reward
    if name == "math":
        from erpo_fast.rewards.math import math_reward

        return math_reward
    raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)}, or module:function")
