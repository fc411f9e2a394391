"""CISPO, masked importance sampling (token "icepop" and sequence geometric-mean masks) and the rollout/learner
mismatch metrics in `erpo_fast.algorithms`, against hand-computed values and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from erpo_fast.algorithms import (
    LOSS_AGGREGATIONS,
    is_correction_weights,
    is_mask_keep,
    mismatch_metrics,
    policy_loss,
    truncated_is_weights,
)

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-12):
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# CISPO
# ---------------------------------------------------------------------------------------------------------------

RATIOS = [0.5, 1.0, 3.0, 8.0]
ADV = [1.0, -1.0, 1.0, -2.0]


def test_cispo_hand_case_value_gradient_and_metrics():
    lp = t([math.log(r) for r in RATIOS]).requires_grad_(True)
    loss, m = policy_loss(lp, torch.zeros(4, dtype=F64), t(ADV), torch.ones(4), loss_type="cispo",
                          cispo_eps_low=0.2, cispo_eps_high=1.0)
    # Weights clip(r, 0.8, 2.0) = [0.8, 1, 2, 2]; loss_i = -w_i A_i logp_i; token_mean over 4.
    w = [0.8, 1.0, 2.0, 2.0]
    expected = sum(-wi * a * math.log(r) for wi, a, r in zip(w, ADV, RATIOS)) / 4
    close(loss, t(expected))
    loss.backward()
    # Every token keeps a gradient, clipped or not: d/dlogp = -w A / 4.
    close(lp.grad, [-wi * a / 4 for wi, a in zip(w, ADV)])
    # CISPO's clip fractions ignore the advantage's sign: 0.5 < 0.8 (low), 3 and 8 > 2 (high).
    assert m["clip_frac_low"] == pytest.approx(0.25) and m["clip_frac_high"] == pytest.approx(0.5)
    assert m["clip_frac"] == pytest.approx(0.75)


def test_cispo_default_has_no_lower_bound():
    lp = t([math.log(0.01), math.log(0.5)]).requires_grad_(True)
    loss, m = policy_loss(lp, torch.zeros(2, dtype=F64), t([1.0, 1.0]), torch.ones(2), loss_type="cispo")
    loss.backward()
    # cispo_eps_low = 1 (default): the weight is the ratio itself below 1; upper cap 1 + 4 = 5 not reached.
    close(lp.grad, [-0.01 / 2, -0.5 / 2])
    assert m["clip_frac"] == 0.0


def test_cispo_on_policy_gradient_equals_ppo():
    """At ratio 1 neither loss clips and both gradients are -A * w_agg (the values differ: CISPO's is -A logp)."""
    g = torch.Generator().manual_seed(0)
    lp0 = -torch.rand(12, dtype=F64, generator=g) * 3
    adv, seq = torch.randn(12, dtype=F64, generator=g), torch.arange(12) // 4
    grads = []
    for loss_type in ("ppo", "cispo"):
        lp = lp0.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, lp0, adv, torch.ones(12), loss_type=loss_type, loss_agg="seq_mean_token_mean",
                              seq_ids=seq)
        loss.backward()
        grads.append(lp.grad)
    close(grads[0], grads[1])


def test_cispo_scales_by_is_weights_and_adds_kl():
    lp = t([0.0, 0.0]).requires_grad_(True)
    loss, _ = policy_loss(lp, t([0.0, 0.0]), t([1.0, -2.0]), torch.ones(2), loss_type="cispo",
                          is_weights=t([0.5, 2.0]), ref_logprobs=t([-0.5, -0.5]), kl_beta=0.1, kl_estimator="k1")
    # logp = 0, so the CISPO term's value is 0; the k1 KL adds 0.1 * 0.5 per token. Gradients: -w A isw + beta.
    close(loss, t(0.05))
    loss.backward()
    close(lp.grad, [(-0.5 + 0.1) / 2, (4.0 + 0.1) / 2])


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_cispo_gradcheck_with_frozen_ratio(loss_agg, ratio_level):
    """CISPO's weight is a stop-gradient, so its gradient is the derivative of the loss with the ratio held fixed:
    gradcheck a function whose old log-probs move with the input (ratio constant, log-prob term differentiated)."""
    g = torch.Generator().manual_seed(3)
    log_ratio = torch.randn(10, dtype=F64, generator=g)
    seq = torch.tensor([4, 1, 4, 9, 1, 9, 4, 0, 1, 9])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    adv = torch.randn(10, dtype=F64, generator=g)
    lp = (-torch.rand(10, dtype=F64, generator=g) * 4).requires_grad_(True)
    kwargs = dict(loss_type="cispo", cispo_eps_low=0.3, cispo_eps_high=0.5, loss_agg=loss_agg, seq_ids=seq,
                  max_len=5, ratio_level=ratio_level, is_weights=torch.rand(10, dtype=F64, generator=g) + 0.5)
    assert torch.autograd.gradcheck(lambda x: policy_loss(x, x.detach() - log_ratio, adv, mask, **kwargs)[0], (lp,))


def test_cispo_validation():
    z, one = torch.zeros(3, dtype=F64), torch.ones(3)
    with pytest.raises(ValueError, match="valid: ppo, cispo"):
        policy_loss(z, z, z, one, loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip belongs to the ppo loss"):
        policy_loss(z, z, z, one, loss_type="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="cispo_eps_high"):
        policy_loss(z, z, z, one, loss_type="cispo", cispo_eps_high=-1.0)
    with pytest.raises(ValueError, match="cispo_eps_low"):
        policy_loss(z, z, z, one, loss_type="cispo", cispo_eps_low=float("inf"))


# ---------------------------------------------------------------------------------------------------------------
# Masked IS
# ---------------------------------------------------------------------------------------------------------------

def test_token_mask_hand_case_inclusive_band():
    ratios = [0.4, 0.5, 1.0, 2.0, 2.1, 1.0]
    learner = t([math.log(r) for r in ratios])
    keep = is_mask_keep(learner, torch.zeros(6, dtype=F64), t([1, 1, 1, 1, 1, 0]), level="token", low=0.5,
                        high=2.0)
    assert keep.tolist() == [False, True, True, True, False, False]  # masked-out token never kept


def test_sequence_mask_uses_the_geometric_mean():
    # seq 7: ratios 3 and 1/3 -> geometric mean 1 (kept, although each token is outside the band);
    # seq 2: ratios 2 and 4.5 -> geometric mean 3 (dropped);
    # seq 5: three ratios 1.5 -> product 3.375 but geometric mean 1.5 (kept); its masked-out garbage is ignored.
    ratios = [3.0, 1 / 3, 2.0, 4.5, 1.5, 1.5, 1.5, 1e6]
    seq = torch.tensor([7, 7, 2, 2, 5, 5, 5, 5])
    mask = t([1, 1, 1, 1, 1, 1, 1, 0])
    learner = t([math.log(r) for r in ratios])
    keep = is_mask_keep(learner, torch.zeros(8, dtype=F64), mask, level="sequence", low=0.5, high=2.0,
                        seq_ids=seq)
    assert keep.tolist() == [True, True, False, False, True, True, True, False]


def test_icepop_weights_are_the_ratio_inside_the_band_and_zero_outside():
    ratios = [0.3, 0.6, 1.2, 1.9, 2.5]
    learner, rollout = t([math.log(r) for r in ratios]), torch.zeros(5, dtype=F64)
    w, keep = is_correction_weights(learner, rollout, torch.ones(5), is_level="token", is_clip=5.0,
                                    is_mask="token", is_mask_low=0.5, is_mask_high=2.0)
    close(w, [0.0, 0.6, 1.2, 1.9, 0.0])
    assert keep.tolist() == [False, True, True, True, False]
    # Mask only (no truncated IS): plain rejection, weight 1 inside the band.
    w_mask, _ = is_correction_weights(learner, rollout, torch.ones(5), is_mask="token", is_mask_low=0.5,
                                      is_mask_high=2.0)
    close(w_mask, [0.0, 1.0, 1.0, 1.0, 0.0])
    # Truncation only equals truncated_is_weights; the keep mask is then the loss mask.
    w_tis, keep_tis = is_correction_weights(learner, rollout, t([1, 1, 1, 1, 0]), is_level="token", is_clip=2.0)
    close(w_tis, truncated_is_weights(learner, rollout, t([1, 1, 1, 1, 0]), clip_max=2.0))
    assert keep_tis.tolist() == [True, True, True, True, False]


def test_sequence_truncation_with_token_mask():
    # seq 0: tokens ratios 1.5, 3.0 (token-masked) -> sequence IS weight min(4.5, 2) = 2 on the kept token only.
    learner = t([math.log(1.5), math.log(3.0), math.log(0.9)])
    seq = torch.tensor([0, 0, 1])
    w, _ = is_correction_weights(learner, torch.zeros(3, dtype=F64), torch.ones(3), is_level="sequence",
                                 is_clip=2.0, is_mask="token", is_mask_low=0.5, is_mask_high=2.0, seq_ids=seq)
    close(w, [2.0, 0.0, 0.9])


def test_masked_tokens_keep_their_place_in_the_normaliser():
    """A rejected token contributes 0 but still counts in token_mean's denominator (IcePop / TRL convention)."""
    lp = t([0.0, math.log(3.0)]).requires_grad_(True)
    w, _ = is_correction_weights(lp.detach(), torch.zeros(2, dtype=F64), torch.ones(2), is_mask="token")
    loss, _ = policy_loss(lp, lp.detach(), t([1.0, 1.0]), torch.ones(2), is_weights=w)
    close(loss, t(-0.5))  # -(1 * 1) / 2: the surviving token's surrogate divided by both tokens
    loss.backward()
    close(lp.grad, [-0.5, 0.0])


def test_masked_is_validation():
    z, one = torch.zeros(3, dtype=F64), torch.ones(3)
    with pytest.raises(ValueError, match="valid: token, sequence"):
        is_mask_keep(z, z, one, level="geometric")
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        is_mask_keep(z, z, one, low=1.5, high=2.0)
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        is_mask_keep(z, z, one, low=0.0)
    with pytest.raises(ValueError, match="needs seq_ids"):
        is_mask_keep(z, z, one, level="sequence")
    with pytest.raises(ValueError, match="expected 3"):
        is_mask_keep(z, torch.zeros(4, dtype=F64), one)


# ---------------------------------------------------------------------------------------------------------------
# Mismatch metrics
# ---------------------------------------------------------------------------------------------------------------

def test_mismatch_metrics_hand_case():
    d = [0.1, -0.2, 1.0]
    learner = t([-1.0 + x for x in d] + [5.0, -2.0])
    rollout = t([-1.0, -1.0, -1.0, -3.0, float("nan")])  # token 3 is masked out; token 4 has no rollout log-prob
    m = mismatch_metrics(learner, rollout, t([1, 1, 1, 0, 1]), ratio_bound=2.0)
    assert m["mismatch_tokens"] == 3
    assert m["mismatch_logp_abs_mean"] == pytest.approx(1.3 / 3, abs=1e-12)
    assert m["mismatch_logp_abs_max"] == pytest.approx(1.0, abs=1e-12)
    assert m["mismatch_kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3, abs=1e-12)
    # |d| > log 2 only for d = 1.0; with bound e^0.15 also 0.2 is outside.
    assert m["mismatch_ratio_outside_frac"] == pytest.approx(1 / 3)
    m2 = mismatch_metrics(learner, rollout, t([1, 1, 1, 0, 1]), ratio_bound=math.exp(0.15))
    assert m2["mismatch_ratio_outside_frac"] == pytest.approx(2 / 3)


def test_mismatch_metrics_zero_when_equal_and_empty():
    lp = -torch.rand(7, dtype=torch.float32)
    m = mismatch_metrics(lp, lp.clone(), torch.ones(7))
    assert m["mismatch_tokens"] == 7
    assert all(m[k] == 0.0 for k in m if k != "mismatch_tokens")
    empty = mismatch_metrics(lp, lp, torch.zeros(7))
    assert empty["mismatch_tokens"] == 0 and empty["mismatch_logp_abs_max"] == 0.0
    with pytest.raises(ValueError, match="ratio_bound"):
        mismatch_metrics(lp, lp, torch.ones(7), ratio_bound=0.5)
