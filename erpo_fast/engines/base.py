"""The rollout-engine contract: what every engine takes, what it returns, and the checks they share.

An engine turns prompts (token ids) into n sampled responses per prompt, each prompt at its own
temperature, and returns every sampled token's log-prob under the *processed* distribution
(logits / T, then top-k, then top-p, renormalised). The learner recomputes exactly these log-probs at
the same per-row temperature, so the importance ratio compares like with like.

Conventions every engine follows:

- ``result[i][j]`` is the j-th sample of prompt i.
- A temperature of 0 means greedy decoding; its log-probs are 0 (the processed distribution is a point
  mass on the argmax).
- When a sample ends on a stop token, that token is the last entry of ``token_ids`` (with its
  log-prob) and ``finish_reason == "stop"``: the learner trains on it. Otherwise the sample holds
  exactly ``max_new_tokens`` tokens and ``finish_reason == "length"``.
- ``stop_token_ids=None`` means "the model's EOS token(s)"; an explicit sequence replaces them (an
  empty sequence disables stopping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from erpo_fast.errors import WeightSyncError

FinishReason = Literal["stop", "length"]


@dataclass
class Sample:
    """One sampled response: its tokens, each token's processed log-prob, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    # Filled by engines that know it; handy for logging, never needed by the learner.
    prompt_index: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Sample has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (NativeEngine, VLLMEngine)."""

    def generate(
        self,
        prompts: list[list[int]],
        temperatures: Sequence[float],
        n: int,
        max_new_tokens: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        top_k: int | Sequence[int] | None = None,
        top_p: float | Sequence[float] | None = None,
        seed: int | Sequence[int] | None = None,
    ) -> list[list[Sample]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int: ...

    def sleep(self, level: int | None = None) -> None: ...

    def wake_up(self) -> None: ...


def validate_generate_args(
    prompts: list[list[int]],
    temperatures: Sequence[float],
    n: int,
    max_new_tokens: int,
    top_k: int | Sequence[int] | None,
    top_p: float | Sequence[float] | None,
    vocab_size: int | None = None,
) -> tuple[list[float], list[int] | None, list[float] | None]:
    """Check `generate`'s arguments; return per-prompt temperature, top-k and top-p lists.

    Raises ValueError with a one-line message on any bad input, so that every engine rejects the same
    things the same way.
    """
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size})")
    temps = [float(t) for t in temperatures]
    if len(temps) != len(prompts):
        raise ValueError(f"got {len(temps)} temperatures for {len(prompts)} prompts; give one per prompt")
    if any(not math.isfinite(t) or t < 0 for t in temps):
        raise ValueError("temperatures must be finite and >= 0 (0 means greedy)")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be a positive int, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    top_ks = _per_prompt(top_k, len(prompts), "top_k", int)
    if top_ks is not None and any(k < 0 for k in top_ks):
        raise ValueError("top_k must be >= 0 (0 or None disables it)")
    top_ps = _per_prompt(top_p, len(prompts), "top_p", float)
    if top_ps is not None and any(not (0.0 < p <= 1.0) for p in top_ps):
        raise ValueError("top_p must be in (0, 1]")
    return temps, top_ks, top_ps


def _per_prompt(value, num_prompts: int, name: str, kind):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [kind(value)] * num_prompts
    values = [kind(v) for v in value]
    if len(values) != num_prompts:
        raise ValueError(f"got {len(values)} {name} values for {num_prompts} prompts; give one or one per prompt")
    return values


def resolve_seeds(seed: int | Sequence[int] | None, num_prompts: int) -> tuple[int | None, list[int] | None]:
    """Split ``seed`` into (one seed for the whole call, or per-prompt seeds); raise on bad input.

    An int makes the identical call reproducible. A sequence (one seed per prompt) makes each prompt's samples
    depend only on its own seed, prompt and temperature: not on which other prompts share the batch.
    """
    if seed is None:
        return None, None
    if isinstance(seed, bool):
        raise ValueError("seed must be an int or one int per prompt, got a bool")
    if isinstance(seed, int):
        return seed, None
    seeds = list(seed)
    if len(seeds) != num_prompts or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a sequence of {num_prompts} ints (one per prompt)")
    return None, seeds


def resolve_stop_token_ids(stop_token_ids: Sequence[int] | None, eos_token_id) -> list[int]:
    """None -> the model's EOS id(s) (an int, a list, or None); an explicit sequence is used as given."""
    if stop_token_ids is None:
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    return [int(t) for t in stop_token_ids]


# Prefixes torch.compile, activation checkpointing, FSDP1 and DDP put into parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def strip_wrappers(name: str) -> str:
    """A parameter name without wrapper prefixes, as the engine's own (Hugging Face) model names it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


SYNC_TRIM = 0.05  # the share of a probe's tokens, those that differ most, that the sync statistic leaves out


def verify_sync(engine_logprobs, learner_logprobs, *, atol: float, what: str = "weight sync check") -> dict:
    """The one weight-sync statistic: the mean |engine - learner| log-prob over a probe's tokens, leaving out the
    5% that differ most (none on a probe under 20 tokens), must be <= atol.

    Trimmed, because in bf16 two synced code paths give a few low-probability tokens log-probs nats apart (up to
    8.7 nats on one token in the bf16 default job, bench/NOTES.md), while an engine that samples from stale weights
    differs on many tokens. Returns ``{"trimmed_mean_abs_diff", "mean_abs_diff", "max_abs_diff", "tokens"}``;
    raises WeightSyncError (a TrainingAborted) when the check fails, or when a log-prob is not finite.
    """
    got = torch.as_tensor(engine_logprobs, dtype=torch.float32).flatten().cpu()
    want = torch.as_tensor(learner_logprobs, dtype=torch.float32).flatten().cpu()
    if got.shape != want.shape or got.numel() == 0:
        raise ValueError(f"{what}: {got.numel()} engine log-probs vs {want.numel()} learner log-probs")
    diff = (got - want).abs().sort().values
    kept = diff[:diff.numel() - int(diff.numel() * SYNC_TRIM)]
    stats = {"trimmed_mean_abs_diff": float(kept.mean()), "mean_abs_diff": float(diff.mean()),
             "max_abs_diff": float(diff.max()), "tokens": diff.numel()}
    if not torch.isfinite(diff).all():  # sorted last and so trimmed away: check them apart
        raise WeightSyncError(f"{what} failed: {int((~torch.isfinite(diff)).sum())} of {diff.numel()} probe "
                              f"log-probs are not finite (engine or learner)")
    if not stats["trimmed_mean_abs_diff"] <= atol:
        raise WeightSyncError(f"{what} failed: the engine's log-probs differ from the learner's by "
                              f"{stats['trimmed_mean_abs_diff']:.4g} on average over the {kept.numel()} of "
                              f"{diff.numel()} probe tokens that differ least (> atol {atol}; all tokens: mean "
                              f"{stats['mean_abs_diff']:.4g}, max {stats['max_abs_diff']:.4g}); the engine is not "
                              f"sampling from the synced weights")
    return stats
