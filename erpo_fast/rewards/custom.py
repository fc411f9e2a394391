"""User verifiers: ``--data.reward module:function`` or ``--data.reward path/to/file.py:function``.

The function has the built-in verifiers' signature, ``fn(response: str, answer: str) -> float`` (see
``erpo_fast/rewards/example_reward.py``). It runs in the reward worker pool like they do: with the same
per-response timeout, a raise or a non-finite value scoring 0 and being logged. An optional attribute
``fn.prepare_answer(answer)`` marks the work that depends on the gold answer alone, so that a slow gold
answer is reported as such rather than blamed on the response.

Workers are fresh processes, and a function loaded from a file is not importable there by name, so the
pool gets a ``CustomReward``: it pickles as its spec and loads the function again when it arrives in a
worker (at worker start-up, not per response).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from erpo_fast.errors import RewardSpecError, first_line


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load(spec: str):
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise RewardSpecError(f"data.reward {spec!r}: expected module:function or path/file.py:function")
    if _is_file_spec(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise RewardSpecError(f"data.reward {spec!r}: file not found: {path}")
        mod_name = "erpo_fast_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                raise RewardSpecError(f"data.reward {spec!r}: importing {path} failed: "
                                      f"{type(e).__name__}: {first_line(e)}") from None
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardSpecError(f"data.reward {spec!r}: cannot import module {target!r}: "
                                  f"{type(e).__name__}: {first_line(e)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardSpecError(f"data.reward {spec!r}: {target} has no attribute {name!r}")
    if not callable(fn):
        raise RewardSpecError(f"data.reward {spec!r}: {name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("response", "answer")
    except TypeError:
        raise RewardSpecError(f"data.reward {spec!r}: {name} must accept (response, answer)") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): let the call decide
    return fn


class CustomReward:
    """A user's verifier, loaded from its spec; picklable (as the spec) for the worker processes."""

    def __init__(self, spec: str):
        self.spec = spec
        self._bind(_load(spec))
        target, _, name = spec.rpartition(":")
        # Workers get the absolute path, so that a relative spec does not depend on their working directory.
        self._portable = f"{Path(target).expanduser().resolve()}:{name}" if _is_file_spec(target) else spec

    def _bind(self, fn) -> None:
        self._fn = fn
        self.__name__ = getattr(fn, "__name__", self.spec)
        prepare = getattr(fn, "prepare_answer", None)
        if prepare is not None:
            self.prepare_answer = prepare

    def __call__(self, response: str, answer: str) -> float:
        return self._fn(response, answer)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "portable": self._portable}

    def __setstate__(self, state: dict) -> None:
        self.spec, self._portable = state["spec"], state["portable"]
        self._bind(_load(self._portable))

    def __repr__(self) -> str:
        return f"CustomReward({self.spec!r})"
