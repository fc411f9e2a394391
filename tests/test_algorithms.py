"""Tests for erpo_fast.algorithms against hand-computed values, closed forms and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from erpo_fast.algorithms import (
    ADVANTAGE_METHODS,
    LOSS_AGGREGATIONS,
    aggregation_weights,
    compute_advantages,
    dynamic_sampling_filter,
    group_kinds,
    per_token_kl,
    per_token_policy_loss,
    policy_loss,
    truncated_is_weights,
)

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, t(expected) if not isinstance(expected, torch.Tensor) else expected,
                               rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------

MIXED = [[1.0, 0.0, 0.0, 1.0]]


def test_grpo_hand_case_uses_unbiased_std():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3); 0.5 / sqrt(1/3) = sqrt(3)/2.
    h = math.sqrt(3) / 2
    close(compute_advantages(t(MIXED), "grpo", eps=0.0), [[h, -h, -h, h]])
    # eps sits in the denominator: 0.5 / (sqrt(1/3) + 0.1).
    e = 0.5 / (math.sqrt(1 / 3) + 0.1)
    close(compute_advantages(t(MIXED), "grpo", eps=0.1), [[e, -e, -e, e]])


def test_dr_grpo_and_rloo_hand_cases():
    close(compute_advantages(t(MIXED), "dr_grpo"), [[0.5, -0.5, -0.5, 0.5]])
    # r=1: others {0,0,1} mean 1/3 -> 2/3;  r=0: others {1,0,1} mean 2/3 -> -2/3.
    close(compute_advantages(t(MIXED), "rloo"), [[2 / 3, -2 / 3, -2 / 3, 2 / 3]])


def test_rloo_is_scaled_dr_grpo():
    # Identity: r_i - (sum - r_i)/(G-1) = G/(G-1) * (r_i - mean).
    rewards = torch.rand(5, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    close(compute_advantages(rewards, "rloo"), 6 / 5 * compute_advantages(rewards, "dr_grpo"), atol=1e-12)


def test_reinforce_pp_divides_by_batch_std_of_centered_values():
    # centered: [0.5, -0.5, 1, -1]; batch mean 0, unbiased var 2.5/3 = 5/6.
    a, b = 0.5 / math.sqrt(5 / 6), 1.0 / math.sqrt(5 / 6)
    close(compute_advantages(t([[1.0, 0.0], [3.0, 1.0]]), "reinforce_pp", eps=0.0), [[a, -a], [b, -b]])


def test_uniform_groups_get_zero_advantage_and_single_response_is_not_nan():
    for method in ("grpo", "dr_grpo", "reinforce_pp"):
        close(compute_advantages(t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), method), [[0.0] * 3, [0.0] * 3])
        out = compute_advantages(t([[1.0], [0.0]]), method)
        close(out, [[0.0], [0.0]])
    close(compute_advantages(t([[1.0], [0.0]], torch.float32), "grpo"), t([[0.0], [0.0]], torch.float32))
    # Uniform groups are exactly zero, even where float32 sums round (0.1, 0.7) and with eps = 0 (no 0/0).
    uniform = t([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]], torch.float32)
    for method in ADVANTAGE_METHODS:
        for eps in (1e-6, 0.0):
            assert bool((compute_advantages(uniform, method, eps=eps) == 0).all()), (method, eps)


def test_ra_all_correct_group_hand_values():
    ones = t([[1.0, 1.0, 1.0]])
    # Pool [1,1,1,0]: mean 0.75, unbiased std sqrt((3*0.0625 + 0.5625)/3) = 0.5 -> 0.25 / 0.5.
    close(compute_advantages(ones, "grpo", eps=0.0, ra=True), [[0.5, 0.5, 0.5]])
    close(compute_advantages(ones, "dr_grpo", ra=True), [[0.25, 0.25, 0.25]])
    # Leave-one-out pool {1,1,0}: baseline 2/3.
    close(compute_advantages(ones, "rloo", ra=True), [[1 / 3, 1 / 3, 1 / 3]])
    # Virtual reward -1: pool [1,1,1,-1], mean 0.5, std sqrt((3*0.25 + 2.25)/3) = 1.
    close(compute_advantages(ones, "grpo", eps=0.0, ra=True, ra_negative_reward=-1.0), [[0.5, 0.5, 0.5]])
    # G == 1: pool [1, 0], mean 0.5, std sqrt(0.5).
    close(compute_advantages(t([[1.0]]), "grpo", eps=0.0, ra=True), [[math.sqrt(0.5)]])


def test_ra_reinforce_pp_batch_hand_values():
    # Group 1 all-correct: mean 0.75 -> centered 1/4 (x3); group 2 mixed: centered 2/3, -1/3, -1/3.
    # Batch of centered values: mean 1/8; squared deviations sum to 73/96; unbiased var 73/480.
    std = math.sqrt(73 / 480)
    out = compute_advantages(t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), "reinforce_pp", eps=0.0, ra=True)
    close(out, [[0.25 / std] * 3, [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std]])


def test_reinforce_pp_identical_centered_values_are_not_blown_up():
    # RA on and every group all-correct: all centered values are 1/4, std 0; dividing by eps would give 250000.
    out = compute_advantages(t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), "reinforce_pp", ra=True)
    close(out, [[0.25] * 3, [0.25] * 3])


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_ra_leaves_other_groups_unchanged(method):
    rewards = t([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.9, 1.0, 1.0], [1.0, 1.0, 2.0]])
    plain = compute_advantages(rewards, method)
    with_ra = compute_advantages(rewards, method, ra=True)
    if method == "reinforce_pp":
        # Batch-level std couples groups, so compare the centered values (dr_grpo) for that one instead.
        plain, with_ra = (compute_advantages(rewards, "dr_grpo"), compute_advantages(rewards, "dr_grpo", ra=True))
    close(with_ra[:3], plain[:3], atol=1e-12)  # mixed, all-wrong, and "0.9 < threshold" groups untouched
    assert bool((with_ra[3] > plain[3] - 1e-12).all()) and not torch.allclose(with_ra[3], plain[3])


def test_ra_respects_success_threshold():
    rewards = t([[0.9, 0.95]])
    close(compute_advantages(rewards, "dr_grpo", ra=True, success_threshold=0.9),
          [[0.9 - 1.85 / 3, 0.95 - 1.85 / 3]])
    close(compute_advantages(rewards, "dr_grpo", ra=True), [[-0.025, 0.025]])  # threshold 1.0: not all-correct


def test_group_kinds_and_dynamic_sampling_filter():
    rewards = t([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5 + 1e-9], [0.3, 0.3]])
    all_correct, all_wrong = group_kinds(rewards)
    assert all_correct.tolist() == [True, False, False, False, False]
    assert all_wrong.tolist() == [False, True, False, True, True]
    keep, dropped = dynamic_sampling_filter(compute_advantages(rewards, "grpo"))
    assert keep.tolist() == [False, False, True, True, False]
    assert dropped == 3
    # RA: an all-correct group keeps a positive advantage, so dynamic sampling keeps it
    keep, dropped = dynamic_sampling_filter(compute_advantages(rewards, "grpo", ra=True))
    assert keep.tolist() == [True, False, True, True, False]
    assert dropped == 2


def test_advantage_input_validation():
    with pytest.raises(ValueError, match="valid: grpo"):
        compute_advantages(t(MIXED), "ppo")
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages(t([[1.0], [0.0]]), "rloo")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        compute_advantages(t([1.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(t([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating"):
        compute_advantages(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="ra_negative_reward"):
        compute_advantages(t(MIXED), ra=True, ra_negative_reward=1.0)
    with pytest.raises(ValueError, match="eps"):
        compute_advantages(t(MIXED), eps=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# Policy loss: surrogate regions, dual clip, KL, IS weights
# ---------------------------------------------------------------------------------------------------------------


def test_clip_regions_hand_case_value_grad_and_metrics():
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    adv = t([1.0, -1.0, -1.0, 1.0, 2.0])
    lp = t([math.log(r) for r in ratios]).requires_grad_(True)
    old = torch.zeros(5, dtype=F64)
    loss, m = policy_loss(lp, old, adv, torch.ones(5, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    # Per token: -1.28 (clipped high), 1.5 (A<0, r>1: unclipped), 0.8 (clipped low), -0.5, -2.2.
    close(loss, (-1.28 + 1.5 + 0.8 - 0.5 - 2.2) / 5)
    loss.backward()
    # Clipped tokens get no gradient; others d(-r A)/dlp = -r A.
    close(lp.grad, [0.0, 1.5 / 5, 0.0, -0.5 / 5, -2.2 / 5])
    assert m["clip_frac_high"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    assert m["clip_frac"] == pytest.approx(0.4)
    assert m["ratio_mean"] == pytest.approx(5.1 / 5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["kl_mean"] == 0.0 and "dual_clip_frac" not in m


def test_dual_clip_hand_case():
    ratios = [4.0, 2.0, 4.0]
    adv = t([-1.0, -1.0, 1.0])
    lp = t([math.log(r) for r in ratios]).requires_grad_(True)
    loss, m = policy_loss(lp, torch.zeros(3, dtype=F64), adv, torch.ones(3), dual_clip=3.0)
    # Token 0: min(-4, -1.28) = -4, bounded by c A = -3 -> loss 3 (no grad). Token 1: -2 > -3 -> loss 2.
    # Token 2 (A > 0) is unaffected by dual clip: clipped at 1.28 -> loss -1.28.
    close(loss, (3.0 + 2.0 - 1.28) / 3)
    loss.backward()
    close(lp.grad, [0.0, 2.0 / 3, 0.0])
    assert m["dual_clip_frac"] == pytest.approx(1 / 3)
    # Without dual clip token 0 costs 4.
    close(policy_loss(lp.detach(), torch.zeros(3, dtype=F64), adv, torch.ones(3))[0], (4.0 + 2.0 - 1.28) / 3)


def test_exploded_ratio_is_clamped_not_nan():
    # log-ratio 100 overflows exp() in float32; the clamp at 20 keeps loss and gradient finite, and the
    # clipped (A > 0) and dual-clipped (A < 0) tokens get exactly zero gradient.
    lp = torch.tensor([100.0, 100.0], requires_grad=True)
    loss, m = policy_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), torch.ones(2), dual_clip=3.0)
    close(loss, torch.tensor((-1.28 + 3.0) / 2), atol=1e-6)
    loss.backward()
    assert lp.grad.tolist() == [0.0, 0.0]
    assert m["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)


def test_low_precision_inputs_accumulate_in_fp32():
    lp = torch.tensor([0.1, -0.2, 0.05], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(3, dtype=torch.bfloat16), torch.ones(3), torch.ones(3))
    assert loss.dtype == torch.float32
    close(loss, -torch.exp(lp.detach().float()).mean(), atol=1e-6)
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


def test_per_token_kl_estimators_hand_values():
    lp, ref = t([0.0, 0.0]), t([-0.5, 1.0])  # d = logp - ref = [0.5, -1]
    close(per_token_kl(lp, ref, "k1"), [0.5, -1.0])
    close(per_token_kl(lp, ref, "k2"), [0.125, 0.5])
    close(per_token_kl(lp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0])


@pytest.mark.parametrize(
    "kind, kl_value, kl_grad",
    [("k1", 0.5, 1.0), ("k2", 0.125, 0.5), ("k3", math.exp(-0.5) - 0.5, 1.0 - math.exp(-0.5))],
)
def test_kl_term_in_loss(kind, kl_value, kl_grad):
    # One token, ratio 1, A = 1: surrogate -1 (grad -1); KL d = 0.5 weighted by beta = 0.1.
    lp = torch.zeros(1, dtype=F64, requires_grad=True)
    loss, m = policy_loss(lp, t([0.0]), t([1.0]), torch.ones(1), ref_logprobs=t([-0.5]), kl_beta=0.1, kl_estimator=kind)
    close(loss, -1.0 + 0.1 * kl_value)
    loss.backward()
    close(lp.grad, [-1.0 + 0.1 * kl_grad])
    assert m["kl_mean"] == pytest.approx(kl_value)
    # beta = 0: no KL in the loss, but the metric still reports it.
    loss0, m0 = policy_loss(lp.detach(), t([0.0]), t([1.0]), torch.ones(1), ref_logprobs=t([-0.5]), kl_estimator=kind)
    close(loss0, -1.0)
    assert m0["kl_mean"] == pytest.approx(kl_value)


def test_is_weights_scale_surrogate_not_kl():
    lp = torch.zeros(2, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(lp, t([0.0, 0.0]), t([1.0, -2.0]), torch.ones(2), ref_logprobs=t([-0.5, -0.5]),
                          kl_beta=0.1, kl_estimator="k1", is_weights=t([0.5, 2.0]))
    # Token 0: -1 * 0.5 + 0.05;  token 1: +2 * 2 + 0.05.
    close(loss, ((-0.5 + 0.05) + (4.0 + 0.05)) / 2)
    loss.backward()
    close(lp.grad, [(-0.5 + 0.1) / 2, (4.0 + 0.1) / 2])


def test_truncated_is_weights_token_and_sequence_levels():
    w = truncated_is_weights(t([0.0, 0.1, 1.0, 3.0]), t([0.0, 0.0, 0.0, 3.0]), t([1, 1, 1, 0]), clip_max=2.0)
    close(w, [1.0, math.exp(0.1), 2.0, 0.0])  # truncated at 2; masked token -> 0
    learner = t([0.2, 0.3, 1.0, -0.1, 0.4]).requires_grad_(True)
    rollout = torch.zeros(5, dtype=F64)
    mask, seq = t([1, 1, 1, 0, 1]), torch.tensor([1, 1, 2, 2, 0])
    ws = truncated_is_weights(learner, rollout, mask, level="sequence", seq_ids=seq, clip_max=2.0)
    # seq 1: exp(0.5); seq 2: exp(1.0) (masked -0.1 excluded) truncated to 2; seq 0: exp(0.4).
    close(ws, [math.exp(0.5), math.exp(0.5), 2.0, 0.0, math.exp(0.4)])
    assert not ws.requires_grad
    ws3 = truncated_is_weights(learner, rollout, mask, level="sequence", seq_ids=seq, clip_max=3.0)
    close(ws3[2], t(math.e))
    # A huge log-ratio sum must truncate, not overflow to inf/NaN.
    big = truncated_is_weights(t([500.0, 500.0]), t([0.0, 0.0]), t([1, 1]), level="sequence",
                               seq_ids=torch.tensor([4, 4]))
    close(big, [2.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------

# Ragged, unsorted, non-contiguous labels. Masked lengths: seq 7 -> 3, seq 3 -> 2, seq 11 -> 1, seq 20 -> 0.
SEQ_IDS = torch.tensor([7, 3, 7, 3, 3, 11, 7, 20, 11])
MASK = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 0])


def test_aggregation_weights_hand_values():
    close(aggregation_weights(MASK, SEQ_IDS, "token_mean", dtype=F64), [1 / 6, 1 / 6, 1 / 6, 0, 1 / 6, 1 / 6,
                                                                         1 / 6, 0, 0])
    # Three sequences with masked tokens (seq 20 has none, so it does not count).
    close(aggregation_weights(MASK, SEQ_IDS, "seq_mean_token_mean", dtype=F64),
          [1 / 9, 1 / 6, 1 / 9, 0, 1 / 6, 1 / 3, 1 / 9, 0, 0])
    close(aggregation_weights(MASK, SEQ_IDS, "seq_mean_token_sum_norm", max_len=4, dtype=F64),
          [1 / 12, 1 / 12, 1 / 12, 0, 1 / 12, 1 / 12, 1 / 12, 0, 0])


@pytest.mark.parametrize("loss_agg, expected", [
    ("token_mean", -24 / 6),                   # masked A: 1,2,3,5,6,7
    ("seq_mean_token_mean", -79 / 18),         # per-seq means 11/3, 7/2, 6 -> mean 79/18
    ("seq_mean_token_sum_norm", -24 / 12),     # 3 seqs * max_len 4
])
def test_policy_loss_aggregation_hand_values(loss_agg, expected):
    adv = t([1.0, 2, 3, 4, 5, 6, 7, 8, 9])
    lp = torch.zeros(9, dtype=F64)  # ratio 1 everywhere: per-token loss is -A
    loss, _ = policy_loss(lp, lp.clone(), adv, MASK, loss_agg=loss_agg, seq_ids=SEQ_IDS, max_len=4)
    close(loss, expected)


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_masked_garbage_and_empty_mask(loss_agg):
    # Masked-out tokens may hold inf/NaN; they must not leak into the loss or the gradient.
    lp = t([0.1, float("inf"), -0.2, float("nan")]).requires_grad_(True)
    old = t([0.0, float("-inf"), 0.0, 0.0])
    adv = t([1.0, float("nan"), -1.0, 5.0])
    mask, seq = torch.tensor([True, False, True, False]), torch.tensor([0, 0, 1, 1])
    loss, m = policy_loss(lp, old, adv, mask, loss_agg=loss_agg, seq_ids=seq, max_len=3,
                          ref_logprobs=t([0.0, float("nan"), 0.0, 0.0]), kl_beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(lp.grad).all())
    assert lp.grad[1] == 0 and lp.grad[3] == 0
    assert all(math.isfinite(v) for v in m.values())
    # All-zero mask: loss 0, zero gradient, metrics 0.
    lp2 = torch.randn(4, dtype=F64, requires_grad=True)
    loss2, m2 = policy_loss(lp2, torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), torch.zeros(4),
                            loss_agg=loss_agg, seq_ids=seq, max_len=3)
    loss2.backward()
    assert loss2.item() == 0.0 and bool((lp2.grad == 0).all())
    assert m2["ratio_mean"] == 0.0 and m2["clip_frac"] == 0.0


def test_policy_loss_is_weighted_sum_of_per_token_loss():
    # The contract the fused kernel implements: loss = sum(w * per_token_policy_loss).
    g = torch.Generator().manual_seed(1)
    lp, old, adv, ref = (torch.randn(9, dtype=F64, generator=g) * 0.5 for _ in range(4))
    isw = torch.rand(9, dtype=F64, generator=g) + 0.5
    kwargs = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, is_weights=isw, ref_logprobs=ref, kl_beta=0.05,
                  kl_estimator="k2")
    for agg in LOSS_AGGREGATIONS:
        loss, _ = policy_loss(lp, old, adv, MASK, loss_agg=agg, seq_ids=SEQ_IDS, max_len=4, **kwargs)
        w = aggregation_weights(MASK, SEQ_IDS, agg, 4, dtype=F64)
        close(loss, (w * per_token_policy_loss(lp, old, adv, **kwargs)).sum(), atol=1e-12)


def test_per_token_policy_loss_is_elementwise():
    # Chunked evaluation must equal the full one (no cross-token coupling), for value and gradient.
    g = torch.Generator().manual_seed(2)
    lp = (torch.randn(10, dtype=F64, generator=g) * 0.4).requires_grad_(True)
    old, adv, ref = (torch.randn(10, dtype=F64, generator=g) * 0.4 for _ in range(3))
    kwargs = dict(dual_clip=2.5, ref_logprobs=ref, kl_beta=0.1)
    full = per_token_policy_loss(lp, old, adv, **kwargs)
    (grad_full,) = torch.autograd.grad(full.sum(), lp)
    parts = [per_token_policy_loss(lp[i:i + 3], old[i:i + 3], adv[i:i + 3], dual_clip=2.5,
                                   ref_logprobs=ref[i:i + 3], kl_beta=0.1) for i in range(0, 10, 3)]
    close(torch.cat(parts), full.detach(), atol=1e-14)
    grads = [torch.autograd.grad(per_token_policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], **{
        **kwargs, "ref_logprobs": ref[i:i + 1]}).sum(), lp)[0][i] for i in range(10)]
    close(torch.stack(grads), grad_full, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# GSPO (sequence-level ratio)
# ---------------------------------------------------------------------------------------------------------------


def test_gspo_value_and_gradient_hand_case():
    lp = t([0.1, 0.3, -0.2]).requires_grad_(True)
    seq, mask, adv = torch.tensor([0, 0, 1]), torch.ones(3), t([1.0, 1.0, -1.0])
    loss, m = policy_loss(lp, torch.zeros(3, dtype=F64), adv, mask, ratio_level="sequence", seq_ids=seq,
                          loss_agg="seq_mean_token_mean", eps_low=0.3, eps_high=0.3)
    s0, s1 = math.exp(0.2), math.exp(-0.2)  # exp(mean log-ratio) per sequence
    close(loss, (-s0 + s1) / 2)
    loss.backward()
    # d s / d lp_t = s / |y|, so grad_t = -A_s * s / (num_seqs * |y_s|).
    close(lp.grad, [-s0 / 4, -s0 / 4, s1 / 2])
    assert m["ratio_mean"] == pytest.approx((2 * s0 + s1) / 3) and m["ratio_max"] == pytest.approx(s0)
    # Clipped: s0 = 1.22 > 1 + 0.1 with A > 0 -> sequence 0 has no gradient, value -1.1.
    lp2 = lp.detach().clone().requires_grad_(True)
    loss2, m2 = policy_loss(lp2, torch.zeros(3, dtype=F64), adv, mask, ratio_level="sequence", seq_ids=seq,
                            loss_agg="seq_mean_token_mean", eps_low=0.3, eps_high=0.1)
    close(loss2, (-1.1 + s1) / 2)
    loss2.backward()
    close(lp2.grad, [0.0, 0.0, s1 / 2])
    assert m2["clip_frac_high"] == pytest.approx(2 / 3)


def direct_gspo_loss(lp, old, adv_seq, mask, seq_ids, eps_low, eps_high):
    """Sequence-level GSPO written directly (no gradient trick): mean_s -min(s A, clip(s) A)."""
    terms = []
    for sid in seq_ids.unique():
        sel = (seq_ids == sid) & (mask != 0)
        if not bool(sel.any()):
            continue
        s = torch.exp((lp[sel] - old[sel]).mean())
        a = adv_seq[int(sid)]
        terms.append(-torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    return torch.stack(terms).mean()


def test_gspo_matches_direct_sequence_level_implementation():
    g = torch.Generator().manual_seed(3)
    seq = torch.tensor([2, 0, 2, 1, 1, 0, 2, 3, 1, 0])
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    old = torch.randn(10, dtype=F64, generator=g)
    adv_seq = t([0.7, -1.3, 0.4, 2.0])
    # Sequence 0 clipped low (A<0), sequence 1 clipped high (A<0 -> unclipped), sequence 2 inside.
    shift = t([-0.5, 0.6, 0.05, 0.0])[seq] + 0.05 * torch.randn(10, dtype=F64, generator=g)
    lp1 = (old + shift).requires_grad_(True)
    lp2 = lp1.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(lp1, old, adv_seq[seq], mask, ratio_level="sequence", seq_ids=seq,
                          loss_agg="seq_mean_token_mean", eps_low=0.2, eps_high=0.28)
    ref = direct_gspo_loss(lp2, old, adv_seq, mask, seq, 0.2, 0.28)
    close(loss, ref, atol=1e-12)
    loss.backward()
    ref.backward()
    close(lp1.grad, lp2.grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck in float64 for every aggregation mode and option
# ---------------------------------------------------------------------------------------------------------------

# Log-ratios placed well inside each region: below 1-eps_low, inside, above 1+eps_high, above dual clip c=3.
LOG_RATIOS = t([-0.5, -0.05, 0.1, 0.5, 1.5, 0.12, -0.4, 0.3, 0.02, 1.3])
GC_SEQ = torch.tensor([4, 1, 4, 9, 1, 9, 4, 0, 1, 9])
GC_MASK = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
GC_ADV = t([-1.0, 0.5, 1.2, 0.8, -0.6, 0.3, -0.9, 0.4, -0.2, 1.1])


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("option", ["plain", "kl_k1", "kl_k2", "kl_k3", "dual_clip", "is_weights", "gspo"])
def test_policy_loss_gradcheck(loss_agg, option):
    g = torch.Generator().manual_seed(4)
    old, adv = torch.randn(10, dtype=F64, generator=g), GC_ADV
    lp = (old + LOG_RATIOS).requires_grad_(True)
    kwargs = dict(loss_agg=loss_agg, seq_ids=GC_SEQ, max_len=5, eps_low=0.2, eps_high=0.28)
    if option.startswith("kl_"):
        kwargs.update(ref_logprobs=old + 0.3 * torch.randn(10, dtype=F64, generator=g), kl_beta=0.1,
                      kl_estimator=option[3:])
    elif option == "dual_clip":
        kwargs.update(dual_clip=3.0)
    elif option == "is_weights":
        kwargs.update(is_weights=torch.rand(10, dtype=F64, generator=g) + 0.5)
    elif option == "gspo":
        # GSPO's token-level trick gives d(value)/d(logp) only when A is constant within each sequence, as
        # GSPO assumes (with per-token advantages the trick defines GSPO-token's own gradient).
        kwargs.update(ratio_level="sequence")
        adv = t([0.0, -0.7, 0.0, 0.0, 1.1, 0.0, 0.0, 0.0, 0.0, 0.6])[GC_SEQ]
        # Keep each sequence's mean log-ratio away from the clip boundaries log(0.8), log(1.28).
        for sid in GC_SEQ.unique():
            sel = GC_SEQ.eq(sid) & GC_MASK.ne(0)
            mean_lr = LOG_RATIOS[sel].mean().item()
            assert min(abs(mean_lr - math.log(0.8)), abs(mean_lr - math.log(1.28))) > 1e-3
    assert torch.autograd.gradcheck(lambda x: policy_loss(x, old, adv, GC_MASK, **kwargs)[0], (lp,))


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def test_policy_loss_input_validation():
    z, one = torch.zeros(3, dtype=F64), torch.ones(3)
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(z, torch.zeros(4, dtype=F64), z, one)
    with pytest.raises(ValueError, match="1-D"):
        policy_loss(z.view(1, 3), z.view(1, 3), z.view(1, 3), one.view(1, 3))
    with pytest.raises(ValueError, match="valid: token_mean"):
        policy_loss(z, z, z, one, loss_agg="sum")
    with pytest.raises(ValueError, match="valid: k1"):
        policy_loss(z, z, z, one, kl_estimator="k4")
    with pytest.raises(ValueError, match="valid: token"):
        policy_loss(z, z, z, one, ratio_level="group")
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(z, z, z, one, eps_low=-0.1)
    with pytest.raises(ValueError, match="eps_high"):
        policy_loss(z, z, z, one, eps_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, z, one, dual_clip=1.0)
    with pytest.raises(ValueError, match="beta"):
        policy_loss(z, z, z, one, kl_beta=-1.0)
    with pytest.raises(ValueError, match="needs seq_ids"):
        policy_loss(z, z, z, one, loss_agg="seq_mean_token_mean")
    with pytest.raises(ValueError, match="needs seq_ids"):
        policy_loss(z, z, z, one, ratio_level="sequence")
    with pytest.raises(ValueError, match="needs max_len"):
        policy_loss(z, z, z, one, loss_agg="seq_mean_token_sum_norm", seq_ids=torch.arange(3))
    with pytest.raises(ValueError, match="0/1"):
        policy_loss(z, z, z, t([0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        aggregation_weights(one, z, "seq_mean_token_mean")
    with pytest.raises(ValueError, match="clip_max"):
        truncated_is_weights(z, z, one, clip_max=0.0)
    with pytest.raises(ValueError, match="valid: token"):
        truncated_is_weights(z, z, one, level="group")
