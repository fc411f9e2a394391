"""Reference backend: full logits, plain torch, differentiated by autograd. Obviously correct, not fast.

This is what the fused backends (`chunked.py`, `triton_kernels.py`) must equal. It materialises the whole
``[N, V]`` logits matrix, so it is only for tests, small shapes, and the "naive" column of the benchmark.

Conventions shared by every backend:
- row i's logits are ``hidden[i] @ weight.T / temperature[i]``; the log-prob of label ``y_i`` is taken from
  ``log_softmax`` of those (the *processed* distribution at the row's own temperature);
- a label equal to ``IGNORE_INDEX`` (-100) gets log-prob 0 and no gradient;
- entropy is the entropy of ``softmax(logits_i / T_i)``, computed for every row (the label plays no part);
- the computation runs in ``promote_types(input dtype, float32)``: bf16/fp16 inputs are upcast (exactly what a
  low-precision matmul with fp32 accumulation computes), float64 inputs stay float64 (for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from erpo_fast import algorithms

IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def linear_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, temperature: Tensor, *, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Label log-probs [N] (and entropies [N]) from full logits; `temperature` is a per-row tensor [N]."""
    dtype = compute_dtype(hidden.dtype)
    logits = (hidden.to(dtype) @ weight.to(dtype).T) / temperature.to(dtype)[:, None]
    logp_all = torch.log_softmax(logits, dim=-1)
    ignored = labels == IGNORE_INDEX
    picked = logp_all.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    logprobs = torch.where(ignored, torch.zeros_like(picked), picked)
    if not return_entropy:
        return logprobs
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logprobs, entropy


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Plain mean of `values` over the tokens where `mask` is set (0.0 when none is)."""
    m = mask.to(torch.bool)
    count = int(m.sum().item())
    if count == 0:
        return 0.0
    return float(values.detach()[m].sum().item()) / count


def correction_metrics(learner_side: Tensor, rollout_logprobs: Tensor | None, mask: Tensor,
                       is_weights: Tensor | None, keep: Tensor | None, ratio_bound: float) -> dict[str, float]:
    """The rollout-correction metrics every backend reports (over the loss mask's tokens):
    `algorithms.mismatch_metrics` of ``learner_side`` vs ``rollout_logprobs`` when those are given,
    ``is_weight_mean`` when IS weights are used, ``is_mask_frac`` (tokens the IS mask rejected) when masking."""
    out: dict[str, float] = {}
    m = mask.to(torch.bool)
    if rollout_logprobs is not None:
        out.update(algorithms.mismatch_metrics(learner_side, rollout_logprobs, m, ratio_bound=ratio_bound))
    sums = {}
    if is_weights is not None:
        sums["is_weight_mean"] = torch.where(m, is_weights.detach(), torch.zeros_like(is_weights)).double().sum()
    if keep is not None:
        sums["is_mask_frac"] = (m & ~keep).double().sum()
    if sums:
        *values, count = torch.stack([*sums.values(), m.double().sum()]).tolist()  # one device->host copy
        out.update({k: v / max(count, 1.0) for k, v in zip(sums, values)})
    return out


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: Tensor,
    advantages: Tensor,
    mask: Tensor,
    spec: algorithms.LossSpec,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    is_weights: Tensor | None = None,
    seq_ids: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """logits -> log_softmax -> gather -> `algorithms.policy_loss` with ``spec``, plus the masked mean entropy.

    ``old_logprobs=None`` means ``logprobs.detach()`` (on-policy). With ``spec.is_correction`` (truncated and/or
    masked IS), ``rollout_logprobs`` become the IS weights, with the learner side being ``old_logprobs`` when
    given, else the log-probs computed here; the mismatch metrics compare the same two.
    """
    logprobs, entropy = linear_logprobs(hidden, weight, labels, temperature, return_entropy=True)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    ref = None if ref_logprobs is None else ref_logprobs.to(logprobs.dtype)
    rollout = None if rollout_logprobs is None else rollout_logprobs.to(logprobs.dtype)
    keep = None
    if spec.is_correction is not None:
        is_weights, keep = algorithms.is_correction_weights(old, rollout, mask, seq_ids=seq_ids, **spec.is_correction)
        if spec.is_mask is None:
            keep = None
    loss, metrics = algorithms.policy_loss(logprobs, old, advantages.to(logprobs.dtype), mask, spec,
                                           ref_logprobs=ref, is_weights=is_weights, seq_ids=seq_ids)
    metrics["entropy_mean"] = masked_mean(entropy, mask)
    metrics.update(correction_metrics(old, rollout, mask, is_weights, keep, spec.mismatch_ratio_bound))
    return loss, metrics
