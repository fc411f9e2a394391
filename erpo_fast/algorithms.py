"""Reference (plain torch) algorithms: group advantages, ERPO's RA, DAPO filtering, and the policy loss.

This module is the ground truth the fused kernels in `erpo_fast.kernels.fused_linear` must equal. It favours
obvious correctness over speed: every function works in float64 as well as float32, and nothing here is fused.

Layouts:
- rewards are `[B, G]`: B groups (prompts) of G responses each;
- the loss works on a PACKED layout of N tokens (no padding): every per-token tensor is `[N]`, `mask` marks the
  tokens that are trained (response tokens), and `seq_ids` labels the sequence each token belongs to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from erpo_fast.choices import (
    ADVANTAGE_METHODS,
    IS_LEVELS,
    IS_MASK_LEVELS,
    KL_KINDS,
    LOSS_AGGREGATIONS,
    LOSS_TYPES,
    RATIO_LEVELS,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_METHODS",
    "GroupPools",
    "LossSpec",
    "IS_LEVELS",
    "IS_MASK_LEVELS",
    "KL_KINDS",
    "LOSS_AGGREGATIONS",
    "LOSS_TYPES",
    "RATIO_LEVELS",
    "aggregation_weights",
    "compute_advantages",
    "dynamic_sampling_filter",
    "group_kinds",
    "gspo_effective_old_logprobs",
    "is_correction_weights",
    "is_mask_keep",
    "mismatch_metrics",
    "per_token_kl",
    "per_token_policy_loss",
    "policy_loss",
    "register_advantage",
    "truncated_is_weights",
]


# --------------------------------------------------------------------------------------------------------------
# The loss settings, declared once
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """Every setting of the GRPO-family policy loss, declared once and validated once (at construction).

    The learner builds it from the config (:meth:`from_config`) and passes it down unchanged:
    ``Learner`` -> ``erpo_fast.kernels.fused_linear.linear_grpo_loss`` -> its backend -> :func:`policy_loss` /
    :func:`per_token_policy_loss`. Those functions also take the settings as keywords (``eps_low=0.1``, ...),
    which override the given spec's (or the defaults'): ``LossSpec.resolve(spec, settings)``.

    - surrogate: ``loss_type`` ppo (clipped surrogate, clip range ``eps_low``/``eps_high``, optional
      ``dual_clip``) or cispo (clipped stop-gradient IS weight, ``cispo_eps_low``/``cispo_eps_high``);
      ``ratio_level`` token or sequence (GSPO); ``max_log_ratio``: clamp of the log-ratio before exp;
    - aggregation: ``loss_agg`` (see :func:`aggregation_weights`), ``max_len`` (Dr. GRPO's constant);
    - KL penalty: ``kl_beta`` times the ``kl_estimator`` against the reference log-probs;
    - rollout correction (used by the fused kernel): ``is_level`` / ``is_clip`` (truncated IS), ``is_mask`` /
      ``is_mask_low`` / ``is_mask_high`` (masked IS), ``mismatch_ratio_bound`` (a metric's band).
    """

    loss_type: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    cispo_eps_low: float = 1.0
    cispo_eps_high: float = 4.0
    ratio_level: str = "token"
    max_log_ratio: float = 20.0
    loss_agg: str = "token_mean"
    max_len: int | None = None
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    is_level: str | None = None
    is_clip: float = 2.0
    is_mask: str | None = None
    is_mask_low: float = 0.5
    is_mask_high: float = 2.0
    mismatch_ratio_bound: float = 2.0

    def __post_init__(self) -> None:
        _check_clip_args(self.eps_low, self.eps_high, self.dual_clip, self.kl_beta)
        _check_loss_type(self.loss_type, self.cispo_eps_low, self.cispo_eps_high, self.dual_clip)
        if self.kl_estimator not in KL_KINDS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; valid: {', '.join(KL_KINDS)}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"unknown ratio_level {self.ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
        if not (self.max_log_ratio > 0):
            raise ValueError(f"max_log_ratio must be > 0, got {self.max_log_ratio}")
        if self.max_len is not None:
            _check_max_len(self.max_len)

    @classmethod
    def from_config(cls, algo, max_len: int | None) -> LossSpec:
        """The spec of an `AlgorithmConfig` (``"none"`` IS settings become None); ``max_len``: the response budget.

        ``is_level="auto"`` is resolved by `config.validate` (token for an async run); an AlgorithmConfig built
        without it (tests, the library API) is synchronous, so auto means none here."""
        return cls(loss_type=algo.loss_type, eps_low=algo.eps_low, eps_high=algo.eps_high, dual_clip=algo.dual_clip,
                   cispo_eps_low=algo.cispo_eps_low, cispo_eps_high=algo.cispo_eps_high,
                   ratio_level=algo.ratio_level, loss_agg=algo.loss_agg, max_len=max_len, kl_beta=algo.kl_beta,
                   kl_estimator=algo.kl_estimator,
                   is_level=None if algo.is_level in ("none", "auto") else algo.is_level,
                   is_clip=algo.is_clip, is_mask=None if algo.is_mask == "none" else algo.is_mask,
                   is_mask_low=algo.is_mask_low, is_mask_high=algo.is_mask_high,
                   mismatch_ratio_bound=algo.mismatch_ratio_bound)

    @classmethod
    def resolve(cls, spec: LossSpec | None, settings: dict) -> LossSpec:
        """``spec`` (or the defaults) with the keyword ``settings`` applied; unknown names are a TypeError."""
        if spec is None:
            return cls(**settings)
        return dataclasses.replace(spec, **settings) if settings else spec

    @property
    def is_correction(self) -> dict | None:
        """`is_correction_weights`'s keywords, or None when neither truncated nor masked IS is on."""
        if self.is_level is None and self.is_mask is None:
            return None
        return dict(is_level=self.is_level, is_clip=self.is_clip, is_mask=self.is_mask,
                    is_mask_low=self.is_mask_low, is_mask_high=self.is_mask_high)


# --------------------------------------------------------------------------------------------------------------
# Group statistics: advantages, RA, filtering
# --------------------------------------------------------------------------------------------------------------


def _check_rewards(rewards: Tensor) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor of shape [B, G], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G] (groups x responses), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    if rewards.shape[1] < 1:
        raise ValueError("rewards must hold at least one response per group (G >= 1)")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")


def group_kinds(rewards: Tensor, success_threshold: float = 1.0) -> tuple[Tensor, Tensor]:
    """Classify each group of `rewards` [B, G].

    Returns `(all_correct, all_wrong)`, two bool tensors [B]: `all_correct` is true when every reward of the
    group is `>= success_threshold`, `all_wrong` when every reward is `< success_threshold`. A group is never
    both; a mixed group is neither. (ERPO's tracker and RA only care about all-correct groups; all-wrong ones
    are reported for logging.)
    """
    _check_rewards(rewards)
    correct = rewards >= success_threshold
    return correct.all(dim=1), (~correct).all(dim=1)


def dynamic_sampling_filter(advantages: Tensor) -> tuple[Tensor, int]:
    """DAPO dynamic sampling: keep only groups with some non-zero advantage.

    A group whose rewards are all identical gets zero GRPO advantage everywhere: it costs a forward/backward
    and teaches nothing. The test is on the advantages of `compute_advantages` [B, G], not on reward variance,
    so that RA's all-correct groups (which keep a positive advantage) are kept, and it is exact (`!= 0`), not
    a threshold. Returns `(keep [B] bool, num_dropped)`.
    """
    _check_rewards(advantages)
    keep = advantages.abs().amax(dim=1) > 0
    return keep, int((~keep).sum().item())


def _sample_std(values: Tensor, count: Tensor, mean: Tensor) -> Tensor:
    """Unbiased (n - 1) std along dim 1 over `values` plus optional extra terms folded into `mean`/`count`.

    `values` [B, K] may hold padding columns set exactly to `mean` (they add zero to the sum of squares);
    `count` [B] is the true number of values per row. Rows with fewer than two values get std 0, so a lone
    response (G == 1) yields advantage 0 instead of NaN.
    """
    sq = (values - mean[:, None]).square().sum(dim=1)
    denom = (count - 1).clamp(min=1)
    return torch.where(count >= 2, (sq / denom).sqrt(), torch.zeros_like(sq))


def compute_advantages(
    rewards: Tensor,
    method: str = "grpo",
    *,
    eps: float = 1e-6,
    ra: bool = False,
    ra_negative_reward: float = 0.0,
    success_threshold: float = 1.0,
) -> Tensor:
    """Per-response advantages from group rewards `[B, G]`; returns `[B, G]` in the rewards' dtype.

    Methods (the baseline is always taken inside the group):
    - ``"grpo"``: ``(r - mean) / (std + eps)``. The std is the *unbiased* sample std (``torch.std``,
      divisor G - 1), as verl's GRPO advantage does.
    - ``"dr_grpo"`` (Dr. GRPO): ``r - mean`` (no std division, which removes the difficulty bias).
    - ``"rloo"``: ``r_i - mean(r_j for j != i)``, the leave-one-out baseline. Needs G >= 2.
    - ``"reinforce_pp"`` (REINFORCE++ with group baseline): ``c = r - group mean``, then ``c / (std(c) + eps)``
      where std is the unbiased std over ALL B*G centered values of the batch. If every centered value is
      identical (e.g. RA on and every group all-correct) the batch carries no scale information and dividing
      by ``0 + eps`` would blow the values up ~1/eps-fold, so they are returned unscaled instead.

    RA (ERPO's "reactivate training signal", ``ra=True``): for each all-correct group (every reward
    ``>= success_threshold``) the group statistics are computed as if the group held one more, virtual,
    response with reward ``ra_negative_reward``: mean and std (grpo, dr_grpo, reinforce_pp's group mean) are
    over G + 1 values, and rloo's leave-one-out pool gains the virtual response (baseline over G values).
    The virtual response gets no advantage of its own, so the real, correct responses get a small positive
    advantage instead of zero. Groups that are not all-correct are untouched.

    A group whose statistics pool is uniform (all rewards equal and no RA response, or G == 1) gets advantage
    exactly 0 for every method: never NaN, and no float rounding residue.
    """
    _check_rewards(rewards)
    if method not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage method {method!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if ra and not ra_negative_reward < success_threshold:
        raise ValueError(
            f"ra_negative_reward ({ra_negative_reward}) must be below success_threshold ({success_threshold}): "
            "RA's virtual response is a failed one"
        )
    num_groups, group_size = rewards.shape

    # Per-group extra virtual response (RA): 1 for all-correct groups when RA is on, else 0.
    if ra:
        all_correct, _ = group_kinds(rewards, success_threshold)
        extra = all_correct.to(rewards.dtype)
    else:
        extra = rewards.new_zeros(num_groups)
    virtual = rewards.new_full((num_groups,), float(ra_negative_reward))
    count = group_size + extra  # number of values in each group's statistics pool
    pool_sum = rewards.sum(dim=1) + extra * virtual
    mean = pool_sum / count

    # A group whose statistics pool is uniform gets exactly zero advantage (GroupPools.zero_if_uniform).
    pool_max = torch.maximum(rewards.amax(dim=1), torch.where(extra > 0, virtual, rewards.amax(dim=1)))
    pool_min = torch.minimum(rewards.amin(dim=1), torch.where(extra > 0, virtual, rewards.amin(dim=1)))
    varies = (pool_max != pool_min)[:, None]
    pools = GroupPools(rewards, count, pool_sum, mean, extra, virtual, varies, eps)
    return ADVANTAGE_ESTIMATORS[method](pools)


@dataclass(frozen=True)
class GroupPools:
    """Each group's statistics pool: its G rewards, plus RA's virtual response where RA applies."""

    rewards: Tensor  # [B, G]
    count: Tensor  # [B] values in the pool: G, or G + 1 with the virtual response
    pool_sum: Tensor  # [B]
    mean: Tensor  # [B]
    extra: Tensor  # [B] 1 where the pool holds the virtual response, else 0
    virtual: Tensor  # [B] the virtual response's reward
    varies: Tensor  # [B, 1] the pool is not uniform
    eps: float

    def zero_if_uniform(self, adv: Tensor) -> Tensor:
        """A uniform pool has, exactly, zero advantage (computing it through sums would leave rounding residue
        (rloo) or 0/0 (grpo with eps=0))."""
        return torch.where(self.varies, adv, torch.zeros_like(adv))


# Advantage estimators, one registered function each (as verl's core_algos): GroupPools -> advantages [B, G].
ADVANTAGE_ESTIMATORS: dict[str, Callable[[GroupPools], Tensor]] = {}


def register_advantage(name: str):
    def register(fn: Callable[[GroupPools], Tensor]) -> Callable[[GroupPools], Tensor]:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return register


@register_advantage("grpo")
def grpo_advantages(p: GroupPools) -> Tensor:
    """``(r - mean) / (std + eps)``, the unbiased std of the pool."""
    # Pool of G real values plus (when extra == 1) the virtual one; padding with `mean` adds nothing.
    pool = torch.cat([p.rewards, torch.where(p.extra > 0, p.virtual, p.mean)[:, None]], dim=1)
    std = _sample_std(pool, p.count, p.mean)
    return p.zero_if_uniform((p.rewards - p.mean[:, None]) / (std[:, None] + p.eps))


@register_advantage("dr_grpo")
def dr_grpo_advantages(p: GroupPools) -> Tensor:
    """``r - mean`` (Dr. GRPO: no std division)."""
    return p.zero_if_uniform(p.rewards - p.mean[:, None])


@register_advantage("rloo")
def rloo_advantages(p: GroupPools) -> Tensor:
    """``r_i -`` the mean of the pool without response i."""
    group_size = p.rewards.shape[1]
    if group_size < 2:
        raise ValueError(f"rloo needs at least 2 responses per group (leave-one-out baseline), got G={group_size}")
    return p.zero_if_uniform(p.rewards - (p.pool_sum[:, None] - p.rewards) / (p.count[:, None] - 1))


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(p: GroupPools) -> Tensor:
    """REINFORCE++ with a group baseline: ``r - group mean``, divided by the batch-wide std (unscaled when the
    batch's centered values are all equal)."""
    centered = p.zero_if_uniform(p.rewards - p.mean[:, None])
    flat = centered.reshape(-1)
    if flat.numel() < 2 or bool(flat.max() == flat.min()):
        return centered
    return centered / (flat.std() + p.eps)


if tuple(ADVANTAGE_ESTIMATORS) != ADVANTAGE_METHODS:  # the config offers erpo_fast.choices.ADVANTAGE_METHODS
    raise ImportError(f"registered advantage estimators {tuple(ADVANTAGE_ESTIMATORS)} differ from "
                      f"erpo_fast.choices.ADVANTAGE_METHODS {ADVANTAGE_METHODS}")


# --------------------------------------------------------------------------------------------------------------
# Policy loss over a packed token layout
# --------------------------------------------------------------------------------------------------------------


def _check_1d(name: str, t: Tensor, n: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] (packed tokens), got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} tokens, expected {n} (shape mismatch)")


def _mask_bool(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be boolean or hold only 0/1 values")
    return mask != 0


def _segments(seq_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary int labels (unsorted, non-contiguous) to dense segment indices 0..S-1."""
    if seq_ids.is_floating_point() or seq_ids.is_complex() or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor, got dtype {seq_ids.dtype}")
    uniq, inverse = torch.unique(seq_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def aggregation_weights(
    mask: Tensor,
    seq_ids: Tensor | None,
    loss_agg: str,
    max_len: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-token weights w [N] such that the aggregated loss is ``sum_i w_i * per_token_loss_i``.

    ``w_i = 0`` wherever ``mask_i == 0``. With S = number of distinct ``seq_ids`` having at least one masked
    token and ``len_s`` = masked tokens of sequence s:
    - ``"token_mean"`` (DAPO): ``w_i = mask_i / sum(mask)``; every trained token counts equally.
    - ``"seq_mean_token_mean"`` (GRPO): ``w_i = mask_i / (S * len_s)``; mean over sequences of the per-sequence
      token mean.
    - ``"seq_mean_token_sum_norm"`` (Dr. GRPO): ``w_i = mask_i / (S * max_len)``; a constant normaliser, so
      long and short responses are not re-weighted. ``max_len`` (the response-length budget) is required.
    ``seq_ids`` are arbitrary integer labels (need not be sorted or contiguous) and are required for the
    ``seq_*`` modes. An all-zero mask gives all-zero weights (loss 0, not NaN). ``dtype`` defaults to the
    mask's dtype when floating, else float32.
    """
    _check_1d("mask", mask)
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    if dtype is None:
        dtype = mask.dtype if mask.is_floating_point() else torch.float32
    m = _mask_bool(mask).to(dtype)
    if loss_agg == "token_mean":
        return m / m.sum().clamp(min=1)
    if seq_ids is None:
        raise ValueError(f"loss_agg={loss_agg!r} needs seq_ids (the sequence label of every token)")
    _check_1d("seq_ids", seq_ids, mask.shape[0])
    seg, num_segments = _segments(seq_ids)
    seq_len = torch.zeros(num_segments, dtype=dtype, device=mask.device).index_add_(0, seg, m)
    num_seqs = (seq_len > 0).sum().to(dtype).clamp(min=1)
    if loss_agg == "seq_mean_token_mean":
        return m / (num_seqs * seq_len[seg].clamp(min=1))
    if max_len is None:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' needs max_len (the response-length budget)")
    _check_max_len(max_len)
    return m / (num_seqs * max_len)


def _check_max_len(max_len) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int (the response-length budget), got {max_len!r}")


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    With ``d = logprobs - ref_logprobs``: ``k1 = d``; ``k2 = d**2 / 2``; ``k3 = exp(-d) + d - 1``
    (= ``exp(ref - logp) - (ref - logp) - 1``, non-negative and unbiased). Elementwise, any shape.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}; valid: {', '.join(KL_KINDS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    return torch.expm1(-d) + d  # expm1 keeps k3 accurate when d is tiny


@torch.no_grad()
def truncated_is_weights(
    learner_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    level: str = "token",
    clip_max: float = 2.0,
    seq_ids: Tensor | None = None,
) -> Tensor:
    """Truncated importance-sampling weights [N] correcting a rollout/learner mismatch (no grad).

    - ``level="token"``: ``w_i = min(exp(learner_i - rollout_i), clip_max)``.
    - ``level="sequence"``: ``w_s = min(exp(sum over the masked tokens of s of (learner - rollout)), clip_max)``,
      broadcast to every token of the sequence (needs ``seq_ids``).
    "Truncated" means only the upper side is clipped (``min(w, C)``), as in truncated IS. Tokens with
    ``mask == 0`` get weight 0 (they are not trained; their log-probs may be garbage).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown IS level {level!r}; valid: {', '.join(IS_LEVELS)}")
    if not (clip_max > 0):
        raise ValueError(f"clip_max must be > 0, got {clip_max}")
    _check_1d("learner_logprobs", learner_logprobs)
    n = learner_logprobs.shape[0]
    _check_1d("rollout_logprobs", rollout_logprobs, n)
    _check_1d("mask", mask, n)
    mb = _mask_bool(mask)
    log_ratio = torch.where(mb, learner_logprobs - rollout_logprobs, torch.zeros_like(learner_logprobs))
    log_clip = math.log(clip_max)
    if level == "sequence":
        if seq_ids is None:
            raise ValueError("level='sequence' needs seq_ids (the sequence label of every token)")
        _check_1d("seq_ids", seq_ids, n)
        seg, num_segments = _segments(seq_ids)
        seq_log = torch.zeros(num_segments, dtype=log_ratio.dtype, device=log_ratio.device)
        log_ratio = seq_log.index_add_(0, seg, log_ratio)[seg]
    # Clamp in log space so a huge sequence sum cannot overflow exp() before truncation.
    w = torch.exp(log_ratio.clamp(max=log_clip))
    return torch.where(mb, w, torch.zeros_like(w))


def _check_band(low: float, high: float) -> None:
    if not (0 < low <= 1.0 <= high and math.isfinite(high)):
        raise ValueError(f"the IS mask band must satisfy 0 < low <= 1 <= high < inf, got [{low}, {high}]")


@torch.no_grad()
def is_mask_keep(
    learner_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    level: str = "token",
    low: float = 0.5,
    high: float = 2.0,
    seq_ids: Tensor | None = None,
) -> Tensor:
    """Masked importance sampling: which tokens keep their place in the loss (bool [N], no grad).

    - ``level="token"`` ("icepop"): token i is kept when ``low <= exp(learner_i - rollout_i) <= high``.
    - ``level="sequence"``: every token of sequence s is kept when the sequence's GEOMETRIC-MEAN ratio
      ``exp(mean over its masked tokens of (learner - rollout))`` lies in ``[low, high]`` (needs ``seq_ids``).
      The geometric mean, unlike the product, does not drift out of any fixed band as responses get longer.
    Bounds are inclusive; the test runs in log space (no overflow). Tokens with ``mask == 0`` are never kept.
    """
    if level not in IS_MASK_LEVELS:
        raise ValueError(f"unknown IS mask level {level!r}; valid: {', '.join(IS_MASK_LEVELS)}")
    _check_band(low, high)
    _check_1d("learner_logprobs", learner_logprobs)
    n = learner_logprobs.shape[0]
    _check_1d("rollout_logprobs", rollout_logprobs, n)
    _check_1d("mask", mask, n)
    mb = _mask_bool(mask)
    log_ratio = torch.where(mb, learner_logprobs - rollout_logprobs, torch.zeros_like(learner_logprobs))
    if level == "sequence":
        if seq_ids is None:
            raise ValueError("IS mask level='sequence' needs seq_ids (the sequence label of every token)")
        _check_1d("seq_ids", seq_ids, n)
        seg, num_segments = _segments(seq_ids)
        sums = torch.zeros(num_segments, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(0, seg, log_ratio)
        counts = torch.zeros(num_segments, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(
            0, seg, mb.to(log_ratio.dtype))
        log_ratio = (sums / counts.clamp(min=1))[seg]
    return mb & (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))


@torch.no_grad()
def is_correction_weights(
    learner_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    is_level: str | None = None,
    is_clip: float = 2.0,
    is_mask: str | None = None,
    is_mask_low: float = 0.5,
    is_mask_high: float = 2.0,
    seq_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rollout-correction weights [N] and the keep mask [N] of masked IS (no grad).

    ``weights = truncated_is_weights(...)`` (``is_level`` token/sequence; 1 when ``None``) times
    ``is_mask_keep(...)`` (``is_mask`` token/sequence; all kept when ``None``). A masked-out token gets weight 0
    but stays in the loss normaliser, as in IcePop and TRL's ``*_mask`` modes (verl's ``rollout_rs`` instead
    drops it from the response mask). Token-level truncation plus a token-level mask with ``is_clip >= is_mask_high``
    is IcePop: the ratio inside the band, 0 outside. Tokens with ``mask == 0`` get weight 0.
    """
    mb = _mask_bool(mask)
    if is_level is not None:
        weights = truncated_is_weights(learner_logprobs, rollout_logprobs, mb, level=is_level, clip_max=is_clip,
                                       seq_ids=seq_ids)
    else:
        weights = mb.to(torch.promote_types(learner_logprobs.dtype, torch.float32))
    if is_mask is None:
        return weights, mb
    keep = is_mask_keep(learner_logprobs, rollout_logprobs, mb, level=is_mask, low=is_mask_low, high=is_mask_high,
                        seq_ids=seq_ids)
    return torch.where(keep, weights, torch.zeros_like(weights)), keep


@torch.no_grad()
def mismatch_metrics(
    learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, ratio_bound: float = 2.0
) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the learner's, over the masked tokens (python floats).

    Both sides must be the sampled tokens' log-probs under the SAME processed distribution (each row at its own
    temperature). Tokens whose rollout log-prob is not finite (the engine gave none) are left out. With
    ``d = learner - rollout``:
    - ``mismatch_logp_abs_mean`` / ``mismatch_logp_abs_max``: mean and max of ``|d|``;
    - ``mismatch_kl_k3``: mean of ``exp(d) - 1 - d``, the k3 estimate of KL(rollout || learner) from tokens the
      rollout sampled (non-negative, unbiased);
    - ``mismatch_ratio_outside_frac``: fraction of tokens whose ratio ``exp(d)`` lies outside
      ``[1 / ratio_bound, ratio_bound]``;
    - ``mismatch_tokens``: the number of tokens measured (all values are 0 when it is 0).
    """
    if not (ratio_bound >= 1.0 and math.isfinite(ratio_bound)):
        raise ValueError(f"ratio_bound must be a finite number >= 1, got {ratio_bound}")
    _check_1d("learner_logprobs", learner_logprobs)
    n = learner_logprobs.shape[0]
    _check_1d("rollout_logprobs", rollout_logprobs, n)
    _check_1d("mask", mask, n)
    dtype = torch.promote_types(learner_logprobs.dtype, torch.float32)
    learner = learner_logprobs.detach().to(dtype)
    rollout = rollout_logprobs.detach().to(dtype)
    mb = _mask_bool(mask) & torch.isfinite(rollout) & torch.isfinite(learner)
    d = torch.where(mb, learner - rollout, torch.zeros_like(learner))
    m = mb.to(dtype)
    count = m.sum()
    zero = torch.zeros((), dtype=dtype, device=d.device)
    values = torch.stack([
        (d.abs() * m).sum() / count.clamp(min=1),
        d.abs().amax() if n else zero,  # masked-out tokens hold d = 0, which never exceeds a real |d|
        ((torch.expm1(d) - d) * m).sum() / count.clamp(min=1),
        ((d.abs() > math.log(ratio_bound)) & mb).to(dtype).sum() / count.clamp(min=1),
        count,
    ]).tolist()
    keys = ("mismatch_logp_abs_mean", "mismatch_logp_abs_max", "mismatch_kl_k3", "mismatch_ratio_outside_frac",
            "mismatch_tokens")
    out = dict(zip(keys, values))
    out["mismatch_tokens"] = int(out["mismatch_tokens"])
    return out


def per_token_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    spec: LossSpec | None = None,
    *,
    is_weights: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    **settings,
) -> Tensor:
    """Per-token policy loss (token-level ratio), BEFORE masking and aggregation; settings from ``spec`` (a
    :class:`LossSpec`; keywords override it).

    This is a PURE ELEMENTWISE function of its tensor inputs (any matching/broadcastable shapes; no reduction,
    no cross-token coupling). The fused kernel relies on that: it evaluates this function chunk by chunk and
    differentiates it w.r.t. ``logprobs`` token by token. Keep it that way.

    With ``r = exp(clamp(logprobs - old_logprobs, -max_log_ratio, max_log_ratio))`` and ``A = advantages``
    (the clamp, as in verl, only matters for a diverged token: it keeps exp() finite so the gradient of a
    clipped or dual-clipped branch cannot become 0 * inf = NaN):
    - clipped surrogate with clip-higher (DAPO): ``obj = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``;
    - dual clip (``dual_clip = c > 1``): for ``A < 0``, ``obj = max(obj, c A)``, bounding the loss of tokens
      whose ratio exploded (dual-clip PPO);
    - loss = ``-obj * is_weights`` (truncated-IS weights scale the surrogate only; they are detached);
    - plus ``kl_beta * per_token_kl(logprobs, ref_logprobs, kl_estimator)`` when ``ref_logprobs`` is given and
      kl_beta > 0.

    ``loss_type="cispo"`` (MiniMax-M1's CISPO) replaces the clipped surrogate by a clipped, stop-gradient IS weight
    times the log-prob: ``loss = -sg(clip(r, 1 - cispo_eps_low, 1 + cispo_eps_high)) * A * logprobs`` (times the
    IS weights; plus the same KL term). Every token keeps a gradient ``-clip(r) A``: none is clipped out of the
    update, only its weight is bounded. ``cispo_eps_low >= 1`` means no lower bound (MiniMax's setting). The eps_*
    and dual_clip arguments belong to the ppo loss; dual_clip must be None with cispo.
    GSPO's sequence-level ratio is obtained by passing ``old_logprobs = gspo_effective_old_logprobs(...)``.
    Inputs must be finite: callers replace masked-out tokens by safe values first (as :func:`policy_loss` does),
    since a zero aggregation weight cannot cancel a NaN.
    """
    s = LossSpec.resolve(spec, settings)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-s.max_log_ratio, s.max_log_ratio))
    if s.loss_type == "cispo":
        weight = ratio.detach().clamp(max(0.0, 1.0 - s.cispo_eps_low), 1.0 + s.cispo_eps_high)
        loss = -(weight * advantages) * logprobs
    else:
        surr = ratio * advantages
        surr_clipped = ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high) * advantages
        obj = torch.minimum(surr, surr_clipped)
        if s.dual_clip is not None:
            obj = torch.where(advantages < 0, torch.maximum(obj, s.dual_clip * advantages), obj)
        loss = -obj
    if is_weights is not None:
        loss = loss * is_weights.detach()
    if ref_logprobs is not None and s.kl_beta > 0:
        loss = loss + s.kl_beta * per_token_kl(logprobs, ref_logprobs, s.kl_estimator)
    return loss


def _check_clip_args(eps_low: float, eps_high: float, dual_clip: float | None, kl_beta: float) -> None:
    if not (0.0 <= eps_low <= 1.0):
        raise ValueError(f"eps_low must be in [0, 1] (lower clip bound 1 - eps_low >= 0), got {eps_low}")
    if not (eps_high >= 0.0 and math.isfinite(eps_high)):
        raise ValueError(f"eps_high must be a finite number >= 0, got {eps_high}")
    if dual_clip is not None and not (dual_clip > 1.0 and math.isfinite(dual_clip)):
        raise ValueError(f"dual_clip must be a finite number > 1 (or None to disable), got {dual_clip}")
    if not (kl_beta >= 0.0 and math.isfinite(kl_beta)):
        raise ValueError(f"kl_beta must be a finite number >= 0, got {kl_beta}")


def _check_loss_type(loss_type: str, cispo_eps_low: float, cispo_eps_high: float, dual_clip: float | None) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not (cispo_eps_low >= 0.0 and math.isfinite(cispo_eps_low)):
        raise ValueError(f"cispo_eps_low must be a finite number >= 0, got {cispo_eps_low}")
    if not (cispo_eps_high >= 0.0 and math.isfinite(cispo_eps_high)):
        raise ValueError(f"cispo_eps_high must be a finite number >= 0, got {cispo_eps_high}")
    if loss_type == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip belongs to the ppo loss; it must be None with loss_type='cispo'")


def gspo_effective_old_logprobs(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, seq_ids: Tensor) -> Tensor:
    """Old log-probs that turn the token-level loss into GSPO's sequence-level one (detached, [N]).

    GSPO's sequence ratio is ``s = exp(mean over the sequence's masked tokens of (logp - old))``. Its
    token-level gradient trick uses, per token, ``ratio_t = sg[s] * exp(logp_t - sg[logp_t])``: the value is
    ``s`` and the gradient flows through each token's own log-prob. Feeding
    ``old_eff = sg[logp] - sg[log s]`` as ``old_logprobs`` to :func:`per_token_policy_loss` gives exactly that
    ratio, so the kernel needs no special GSPO path. Masked-out tokens get ``sg[logp]`` (ratio 1).
    """
    n = logprobs.shape[0]
    _check_1d("seq_ids", seq_ids, n)
    mb = _mask_bool(mask)
    seg, num_segments = _segments(seq_ids)
    with torch.no_grad():
        lp = logprobs.detach()
        diff = torch.where(mb, lp - old_logprobs.detach(), torch.zeros_like(lp))
        sums = torch.zeros(num_segments, dtype=lp.dtype, device=lp.device).index_add_(0, seg, diff)
        counts = torch.zeros(num_segments, dtype=lp.dtype, device=lp.device).index_add_(0, seg, mb.to(lp.dtype))
        log_s = (sums / counts.clamp(min=1))[seg]
        return torch.where(mb, lp - log_s, lp)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    spec: LossSpec | None = None,
    *,
    ref_logprobs: Tensor | None = None,
    seq_ids: Tensor | None = None,
    is_weights: Tensor | None = None,
    **settings,
) -> tuple[Tensor, dict[str, float]]:
    """Aggregated policy loss over N packed tokens: ``sum_i w_i * per_token_policy_loss_i`` and metrics.

    Settings come from ``spec`` (a :class:`LossSpec`; keywords such as ``eps_low=0.1`` override it).

    - ``w = aggregation_weights(mask, seq_ids, loss_agg, max_len)`` (see there; zero where mask == 0).
    - ``ratio_level="token"``: ratio ``exp(logprobs - old_logprobs)`` per token (PPO/GRPO/DAPO); the log-ratio
      is clamped to ``[-max_log_ratio, max_log_ratio]`` (see :func:`per_token_policy_loss`).
    - ``ratio_level="sequence"`` (GSPO): the ratio of every token of sequence s is
      ``s = exp(mean over its masked tokens of (logp - old))``, with the per-token gradient trick
      (see :func:`gspo_effective_old_logprobs`). Needs ``seq_ids``. The gradient equals the derivative of
      the loss value when the advantages (and IS weights) are constant within each sequence, as GSPO assumes;
      with per-token advantages it is, by definition, GSPO-token's gradient.
    - Tokens with mask == 0 contribute nothing and get zero gradient, even if their inputs are inf/NaN.
    - An all-zero mask gives loss 0 (with a zero gradient), not NaN.
    - ``loss_type`` ``"ppo"`` (clipped surrogate) or ``"cispo"`` (see :func:`per_token_policy_loss`).

    Metrics (python floats, computed without grad, plain means over masked tokens; 0 when no token is masked):
    ``clip_frac_low`` (ratio < 1 - eps_low and A < 0), ``clip_frac_high`` (ratio > 1 + eps_high and A > 0),
    ``clip_frac`` (their sum), ``kl_mean`` (the ``kl_estimator`` vs ``ref_logprobs``; 0 without a reference),
    ``ratio_mean``, ``ratio_max``, and ``dual_clip_frac`` (A < 0 and the ``c A`` bound active) when dual clip
    is on. With ``loss_type="cispo"`` the clip fractions count the tokens whose IS weight is clipped, whatever
    the advantage's sign: ``clip_frac_low`` (ratio < 1 - cispo_eps_low), ``clip_frac_high`` (ratio >
    1 + cispo_eps_high).
    """
    _check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, is_weights)
    spec = LossSpec.resolve(spec, settings)
    if spec.ratio_level == "sequence" and seq_ids is None:
        raise ValueError("ratio_level='sequence' (GSPO) needs seq_ids (the sequence label of every token)")

    mb = _mask_bool(mask)
    # Accumulate in at least fp32 (bf16 inputs are upcast; float64 stays float64 for the references).
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    weights = aggregation_weights(mb, seq_ids, spec.loss_agg, spec.max_len, dtype=dtype)

    # Masked-out tokens may hold garbage (padding-free packing still has prompt tokens): replace their inputs
    # by safe values BEFORE any exp, so neither the loss nor its gradient can pick up inf * 0 = NaN.
    def safe(x: Tensor) -> Tensor:
        x = x.to(dtype)
        return torch.where(mb, x, torch.zeros_like(x))

    lp, old, adv = safe(logprobs), safe(old_logprobs.detach()), safe(advantages.detach())
    ref = safe(ref_logprobs.detach()) if ref_logprobs is not None else None
    isw = safe(is_weights.detach()) if is_weights is not None else None
    if spec.ratio_level == "sequence":
        old = gspo_effective_old_logprobs(lp, old, mb, seq_ids)

    per_token = per_token_policy_loss(lp, old, adv, spec, is_weights=isw, ref_logprobs=ref)
    loss = (weights * per_token).sum()
    return loss, _policy_loss_metrics(lp.detach(), old, adv, ref, mb, spec)


def _check_loss_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                       ref_logprobs: Tensor | None, is_weights: Tensor | None) -> None:
    _check_1d("logprobs", logprobs)
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got dtype {logprobs.dtype}")
    n = logprobs.shape[0]
    _check_1d("old_logprobs", old_logprobs, n)
    _check_1d("advantages", advantages, n)
    _check_1d("mask", mask, n)
    if ref_logprobs is not None:
        _check_1d("ref_logprobs", ref_logprobs, n)
    if is_weights is not None:
        _check_1d("is_weights", is_weights, n)


@torch.no_grad()
def _policy_loss_metrics(lp: Tensor, old: Tensor, adv: Tensor, ref: Tensor | None, mb: Tensor,
                         spec: LossSpec) -> dict[str, float]:
    """`policy_loss`'s metrics from its safe (masked-out = 0) inputs; see its docstring."""
    eps_low, eps_high, dual_clip, max_log_ratio = spec.eps_low, spec.eps_high, spec.dual_clip, spec.max_log_ratio
    dtype, n = lp.dtype, lp.shape[0]
    ratio = torch.exp((lp - old).clamp(-max_log_ratio, max_log_ratio))  # as the loss saw it
    m = mb.to(dtype)
    count = m.sum().clamp(min=1)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    if spec.loss_type == "cispo":
        low = (ratio < 1.0 - spec.cispo_eps_low)
        high = (ratio > 1.0 + spec.cispo_eps_high)
    else:
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
    stats = {
        "clip_frac_low": low.to(dtype),
        "clip_frac_high": high.to(dtype),
        "kl_mean": per_token_kl(lp, ref, spec.kl_estimator) if ref is not None else None,
        "ratio_mean": ratio,
    }
    if dual_clip is not None:
        clipped_obj = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
        stats["dual_clip_frac"] = ((adv < 0) & (dual_clip * adv > clipped_obj)).to(dtype)
    values = {k: (v * m).sum() / count if v is not None else zero for k, v in stats.items()}
    # Ratios are positive, so zeroing unmasked ones leaves the masked max (or 0 when nothing is masked).
    values["ratio_max"] = torch.where(mb, ratio, zero).amax() if n else zero
    # One device->host copy for all metrics.
    floats = torch.stack(list(values.values())).tolist()
    metrics = dict(zip(values.keys(), floats))
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    return metrics
