"""Fused linear log-prob and GRPO-loss ops with a per-row temperature: public functions and autograd glue.

``linear_logprobs`` and ``linear_grpo_loss`` take the model's last hidden states and the LM-head weight, never
the ``[N, V]`` logits. Row i is scored at its own temperature: ``logits_i = hidden_i @ weight.T / T_i``.

Backends (``backend=``): ``"reference"`` (naive.py, full logits, autograd), ``"torch"`` (chunked.py, the CPU
default), ``"triton"`` (triton_kernels.py, the CUDA default; on CPU only under ``TRITON_INTERPRET=1``) and
``"auto"``. The loss math is never re-derived here: it is `erpo_fast.algorithms` evaluated chunk by chunk.

How ``linear_grpo_loss`` gets its gradients (fast backends):
- ``ratio_level="token"``: the per-token loss is an elementwise function of the token's log-prob, so for each
  row chunk ``dL/dlogp = w_i * d per_token_policy_loss / d logp_i`` (a tiny autograd call on the chunk's
  vector, with ``w = aggregation_weights(...)`` precomputed for all N tokens). The backend turns that into
  ``grad_hidden`` and ``grad_weight`` inside the forward pass: three matmuls for the whole step. The autograd
  Function stores those gradients and its backward only scales them by ``grad_output``.
- ``ratio_level="sequence"`` (GSPO) is the documented exception: a token's derivative depends on its whole
  sequence, so a no-grad log-prob pass runs first, ``dL/dlogp`` comes from autograd through
  ``algorithms.policy_loss`` on the N-vector, and a gradient pass recomputes the logits (four matmuls).
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch import Tensor

from erpo_fast import algorithms

from . import chunked, naive
from .naive import IGNORE_INDEX

BACKENDS = ("auto", "reference", "torch", "triton")


# --------------------------------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------------------------------

def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H] (packed tokens x hidden size), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (vocab x hidden size), got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"hidden must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(f"hidden, weight and labels must be on one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be 1-D [N] with N = {hidden.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and bool(((labels < 0) & (labels != IGNORE_INDEX)).any() | (labels >= weight.shape[0]).any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored)")


def _temperature(temperature: Tensor | float, n: int, device: torch.device) -> Tensor:
    """Per-row fp32 temperature [N], validated > 0 and finite; a python float or 0-d tensor is broadcast."""
    if isinstance(temperature, Tensor):
        if not (temperature.is_floating_point() or temperature.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"temperature must be a float tensor, got dtype {temperature.dtype}")
        t = temperature.to(device=device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(n)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"temperature must be a float or a tensor of shape [{n}], got {tuple(t.shape)}")
        if t.numel() and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"temperature must be > 0 and finite on every row (min {t.min().item():.4g})")
        return t.contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    return torch.full((n,), float(temperature), dtype=torch.float32, device=device)


def _resolve_backend(backend: str, hidden: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if hidden.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing "
                               "triton); use backend='torch' on CPU")
        if hidden.dtype == torch.float64:
            raise ValueError("backend='triton' supports float32/bfloat16/float16 inputs, not float64")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _impl(backend: str) -> ModuleType:
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels
    return chunked


# --------------------------------------------------------------------------------------------------------------
# linear_logprobs
# --------------------------------------------------------------------------------------------------------------

class _LinearLogprobsFn(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_t, impl):
        logp, entropy, lse = impl.logprobs_forward(hidden, weight, labels, inv_t)
        ctx.save_for_backward(hidden, weight, labels, inv_t, lse, entropy)
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, labels, inv_t, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None
        grad_h, grad_w = ctx.impl.logprobs_backward(hidden, weight, labels, inv_t, lse, grad_logp, grad_entropy,
                                                    entropy, need_h, need_w)
        return grad_h, grad_w, None, None, None


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: Tensor | float,
    *,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of ``labels`` under ``softmax(hidden @ weight.T / temperature)``, row by row, without [N, V] logits.

    Args:
        hidden: ``[N, H]`` last hidden states (fp32, bf16, fp16; fp64 on the reference/torch backends).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[N]`` integer token ids in ``[0, V)``; ``-100`` marks a row to ignore (log-prob 0, no gradient).
        temperature: per-row ``[N]`` tensor or a python float (broadcast); must be > 0. It is runtime data:
            a new value never recompiles a kernel.
        return_entropy: also return the entropy of each row's processed distribution ``softmax(logits / T)``
            (computed for every row, ignored-label rows included). Differentiable as well.
        backend: ``"auto"`` (triton on CUDA, torch otherwise), ``"torch"``, ``"triton"`` or ``"reference"``.

    Returns ``logprobs [N]`` (and ``entropy [N]``) in float32 (float64 for float64 inputs). Differentiable w.r.t.
    ``hidden`` and ``weight``; the backward recomputes logits chunk by chunk, so memory stays bounded.
    """
    _check_inputs(hidden, weight, labels)
    labels = labels.to(torch.int64)
    temp = _temperature(temperature, hidden.shape[0], hidden.device)
    backend = _resolve_backend(backend, hidden)
    if backend == "reference":
        return naive.linear_logprobs(hidden, weight, labels, temp, return_entropy=return_entropy)
    inv_t = 1.0 / temp.to(torch.promote_types(hidden.dtype, torch.float32))
    logp, entropy, _ = _LinearLogprobsFn.apply(hidden.contiguous(), weight.contiguous(), labels, inv_t,
                                               _impl(backend))
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------------------------
# linear_grpo_loss
# --------------------------------------------------------------------------------------------------------------

class _LossInputs:
    """The per-token loss inputs, converted once to the compute dtype, plus the aggregation weights."""

    def __init__(self, n, dtype, device, advantages, mask, old_logprobs, ref_logprobs, is_weights, seq_ids,
                 spec: algorithms.LossSpec, rollout_logprobs=None):
        is_correction = spec.is_correction
        def vec(name, t, required=True):
            if t is None:
                if required:
                    raise ValueError(f"{name} is required")
                return None
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must be 1-D [N] with N = {n}, got shape {tuple(t.shape)}")
            return t.detach().to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

        self.advantages = vec("advantages", advantages)
        self.mask = vec("mask", mask)
        self.old = vec("old_logprobs", old_logprobs, required=False)
        self.ref = vec("ref_logprobs", ref_logprobs, required=False)
        self.is_weights = vec("is_weights", is_weights, required=False)
        self.seq_ids = vec("seq_ids", seq_ids, required=False)
        self.rollout = vec("rollout_logprobs", rollout_logprobs, required=False)
        self.spec = spec
        self.is_correction = is_correction
        self.keep = None
        if not self.advantages.is_floating_point():
            self.advantages = self.advantages.to(dtype)
        if is_correction is not None:
            if self.is_weights is not None:
                raise ValueError("pass either is_weights or an IS correction (is_level / is_mask), not both")
            if self.rollout is None:
                raise ValueError("is_level / is_mask need rollout_logprobs (the engine's log-probs)")
        # policy_loss validates every option (names, clip ranges, seq_ids/max_len needs) on a tiny dry run, so
        # bad arguments fail here with its message, before any expensive pass.
        probe = torch.zeros(n, dtype=dtype, device=device)
        self.mask_bool = self.mask if self.mask.dtype == torch.bool else algorithms._mask_bool(self.mask)
        if is_correction is not None:
            algorithms.is_correction_weights(probe, probe, self.mask_bool, seq_ids=self.seq_ids, **is_correction)
            if not bool(torch.isfinite(self.rollout[self.mask_bool]).all()):
                raise ValueError("rollout_logprobs must be finite on every masked (trained) token for is_level / "
                                 "is_mask")
        empty = torch.zeros(0)  # validates ratio_bound now, on the host
        algorithms.mismatch_metrics(empty, empty, empty, ratio_bound=spec.mismatch_ratio_bound)
        self.full_loss(probe, probe if self.old is None else self.old)
        self.weights = algorithms.aggregation_weights(self.mask_bool, self.seq_ids, spec.loss_agg, spec.max_len,
                                                      dtype=dtype)
        # IS weights from the rollout log-probs: the learner side is old_logprobs when given (known now), else the
        # log-probs this call computes. Token-level weights are then elementwise in them and are evaluated chunk
        # by chunk; a sequence-level weight or mask needs the whole sequence first (one extra pass, as GSPO).
        self.is_from_logp = is_correction is not None and self.old is None
        self.needs_full_logp = self.is_from_logp and "sequence" in (is_correction.get("is_level"),
                                                                     is_correction.get("is_mask"))
        if is_correction is not None and self.old is not None:
            self.set_is(self.old)

    def set_is(self, learner_side: Tensor) -> None:
        """IS weights (and the keep mask) for all N tokens from the learner-side log-probs."""
        self.is_weights, keep = algorithms.is_correction_weights(
            learner_side, self.rollout, self.mask_bool, seq_ids=self.seq_ids, **self.is_correction)
        self.keep = keep if self.spec.is_mask is not None else None

    def chunk_is(self, start: int, end: int, logp: Tensor) -> Tensor:
        """Token-level IS weights of tokens [start, end) from their own (detached) log-probs."""
        weights, _ = algorithms.is_correction_weights(logp.detach(), self.rollout[start:end],
                                                      self.mask_bool[start:end], **self.is_correction)
        return weights

    def extra_metrics(self, logp: Tensor) -> dict[str, float]:
        learner_side = logp if self.old is None else self.old
        return naive.correction_metrics(learner_side, self.rollout, self.mask_bool, self.is_weights, self.keep,
                                        self.spec.mismatch_ratio_bound)

    def full_loss(self, logprobs: Tensor, old: Tensor):
        return algorithms.policy_loss(logprobs, old, self.advantages, self.mask, self.spec, ref_logprobs=self.ref,
                                      is_weights=self.is_weights, seq_ids=self.seq_ids)

    def token_dlogp(self, start: int, end: int, logp: Tensor) -> Tensor:
        """dL/dlogp for tokens [start, end): ``w * d per_token_policy_loss / d logp`` (token-level ratio).

        Masked-out tokens are neutralised exactly as `algorithms.policy_loss` does (inputs replaced by 0
        before any exp), so inf/NaN there cannot leak into the gradient.
        """
        mb = self.mask_bool[start:end]

        def safe(chunk):
            return None if chunk is None else torch.where(mb, chunk, 0.0)

        def rows(full):
            return None if full is None else full[start:end]

        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            old = lp.detach() if self.old is None else rows(self.old)
            isw = self.chunk_is(start, end, logp) if self.is_from_logp else rows(self.is_weights)
            per_token = algorithms.per_token_policy_loss(safe(lp), safe(old), safe(rows(self.advantages)), self.spec,
                                                         is_weights=safe(isw), ref_logprobs=safe(rows(self.ref)))
            (grad,) = torch.autograd.grad((self.weights[start:end] * per_token).sum(), lp)
        return grad


def _grpo_forward(impl, hidden, weight, labels, inv_t, inputs: _LossInputs, need_h: bool, need_w: bool):
    """(loss, metrics, grad_hidden, grad_weight) with the gradients of the loss itself (grad_output = 1)."""
    grad_h = grad_w = None
    token_level = inputs.spec.ratio_level == "token" and not inputs.needs_full_logp
    if (need_h or need_w) and token_level:
        logp, entropy, grad_h, grad_w = impl.fused_forward_backward(hidden, weight, labels, inv_t,
                                                                    inputs.token_dlogp, need_h, need_w)
    else:
        logp, entropy, lse = impl.logprobs_forward(hidden, weight, labels, inv_t)
    if inputs.is_from_logp:
        inputs.set_is(logp)  # all N weights, for the loss value and metrics (and the sequence-level gradient)
    old = logp if inputs.old is None else inputs.old
    if (need_h or need_w) and not token_level:
        # GSPO, or sequence-level IS weights/masks from on-policy log-probs: the tokens of a sequence are
        # coupled, so differentiate the whole N-vector loss.
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            loss, metrics = inputs.full_loss(lp, old if inputs.old is not None else lp.detach())
            (dlogp,) = torch.autograd.grad(loss, lp)
        grad_h, grad_w = impl.logprobs_backward(hidden, weight, labels, inv_t, lse, dlogp, None, entropy,
                                                need_h, need_w)
    else:
        with torch.no_grad():
            loss, metrics = inputs.full_loss(logp, old)
    metrics["entropy_mean"] = naive.masked_mean(entropy, inputs.mask_bool)
    metrics.update(inputs.extra_metrics(logp))
    return loss.detach(), metrics, grad_h, grad_w


class _LinearGRPOLossFn(torch.autograd.Function):
    """Forward computes the loss AND its gradients (3 matmuls); backward only scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_t, impl, inputs, metrics_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, metrics, grad_h, grad_w = _grpo_forward(impl, hidden, weight, labels, inv_t, inputs, need_h, need_w)
        metrics_out.update(metrics)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_grpo_loss computes its gradients in the forward pass; its backward can run "
                               "only once (no retain_graph re-use)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # drop our references so autograd can take the tensors as .grad without copying
        # In-place scaling: a fresh [V, H] product would double the peak memory of the weight gradient. On CPU the
        # common grad_output == 1 is cheap to detect; on CUDA that check would sync, and the scale is cheap.
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            for g in (grad_h, grad_w):
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return grad_h, grad_w, None, None, None, None, None


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: Tensor | float,
    advantages: Tensor,
    mask: Tensor,
    spec: algorithms.LossSpec | None = None,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    seq_ids: Tensor | None = None,
    is_weights: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    backend: str = "auto",
    **settings,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO-family policy loss straight from hidden states, equal to `erpo_fast.algorithms.policy_loss` applied to
    ``linear_logprobs(hidden, weight, labels, temperature)``, without ever holding the [N, V] logits.

    The loss settings come from ``spec`` (an `erpo_fast.algorithms.LossSpec`, built once by the learner);
    keywords (``eps_low=0.1``, ``is_level="token"``, ...) override it, or the defaults when no spec is given.

    Per-token inputs are packed ``[N]`` vectors: ``advantages``, ``mask`` (tokens that are trained),
    ``old_logprobs`` (``None`` = on-policy, i.e. ``logprobs.detach()``), ``ref_logprobs`` (for the KL term when
    ``kl_beta > 0``), ``is_weights`` (truncated importance weights) and ``seq_ids`` (needed by the ``seq_*``
    aggregations and by ``ratio_level="sequence"``, GSPO). The remaining keywords are `policy_loss`'s.

    ``loss_type="cispo"`` selects CISPO (a clipped, stop-gradient IS weight times the log-prob, bounds
    ``cispo_eps_low`` / ``cispo_eps_high``) instead of the clipped surrogate; see `policy_loss`.

    Rollout correction: ``rollout_logprobs`` [N] are the engine's log-probs of the same tokens. With
    ``is_level`` (``"token"``/``"sequence"``: truncated IS, cap ``is_clip``) and/or ``is_mask``
    (``"token"``/``"sequence"``: masked IS, band ``[is_mask_low, is_mask_high]``, geometric mean per sequence)
    the IS weights are `algorithms.is_correction_weights` of the learner side against them, where the learner side
    is ``old_logprobs`` when given, else the log-probs computed here (token-level weights then cost nothing
    extra; sequence-level ones take one extra no-grad pass, as GSPO does). Given ``rollout_logprobs``, the metrics
    also hold `algorithms.mismatch_metrics` of the same two (``mismatch_*``, ratio band ``mismatch_ratio_bound``).

    Returns ``(loss, metrics)``: a 0-d float32 tensor (float64 for float64 inputs) differentiable w.r.t.
    ``hidden`` and ``weight``, and `policy_loss`'s metrics (clip_frac, clip_frac_low/high, kl_mean, ratio_mean,
    ratio_max, dual_clip_frac) plus ``entropy_mean`` (mean entropy of the processed distribution over masked
    tokens), ``is_weight_mean`` (when IS weights are used), ``is_mask_frac`` (when ``is_mask`` is on) and the
    ``mismatch_*`` values. The fast backends compute the gradients during the forward pass (see the module
    docstring), so the backward is nearly free and may run only once.
    """
    _check_inputs(hidden, weight, labels)
    labels = labels.to(torch.int64)
    n = hidden.shape[0]
    temp = _temperature(temperature, n, hidden.device)
    backend = _resolve_backend(backend, hidden)
    spec = algorithms.LossSpec.resolve(spec, settings)
    if backend == "reference":
        if spec.is_correction is not None and is_weights is not None:
            raise ValueError("pass either is_weights or an IS correction (is_level / is_mask), not both")
        if spec.is_correction is not None and rollout_logprobs is None:
            raise ValueError("is_level / is_mask need rollout_logprobs (the engine's log-probs)")
        return naive.linear_grpo_loss(hidden, weight, labels, temp, advantages, mask, spec, old_logprobs=old_logprobs,
                                      ref_logprobs=ref_logprobs, is_weights=is_weights, seq_ids=seq_ids,
                                      rollout_logprobs=rollout_logprobs)
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    inputs = _LossInputs(n, cdt, hidden.device, advantages, mask, old_logprobs, ref_logprobs, is_weights, seq_ids,
                         spec, rollout_logprobs)
    metrics: dict[str, float] = {}
    loss = _LinearGRPOLossFn.apply(hidden.contiguous(), weight.contiguous(), labels, 1.0 / temp.to(cdt),
                                   _impl(backend), inputs, metrics)
    return loss, metrics
