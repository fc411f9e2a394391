"""Fused linear log-prob / GRPO-loss kernels: every backend against the full-logits float64 reference.

References are independent of the code under test: `naive.py` (full logits + autograd) evaluated in float64 on
the same (dtype-rounded) inputs, and Liger's `LigerFusedLinearGRPOLoss` for peer parity. Shapes are small and
odd (vocabularies and row counts that are multiples of no block size), chunk sizes are shrunk so that every
run crosses several row chunks and ragged vocabulary tiles, and temperatures are log-uniform over [0.05, 4].
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from erpo_fast.kernels.fused_linear import IGNORE_INDEX, chunked, linear_grpo_loss, linear_logprobs

FP32_TOL = 1e-4  # relative error norm vs float64; fp32 results land around 1e-6
BF16_TOL = 2e-2  # bf16 operands and bf16 gradients (2**-9 rounding) land around 3e-3
FP64_TOL = 1e-10

TRITON_OK = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite values in the result"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: FP64_TOL, torch.float32: FP32_TOL}.get(dtype, BF16_TOL)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several row chunks and ragged vocabulary tiles on tiny shapes."""
    monkeypatch.setattr(chunked, "ROW_CHUNK_BYTES", 11 * 1003 * 8)  # 11 rows of V=1003 in float64, 22 in fp32
    monkeypatch.setattr(chunked, "VOCAB_TILE", 128)
    if TRITON_OK:
        from erpo_fast.kernels.fused_linear import triton_kernels

        monkeypatch.setattr(triton_kernels, "ROW_CHUNK_BYTES", 16 * 257 * 4)  # 16-row chunks at V=257 (10 in bf16)


def make_inputs(seed: int, n: int, h: int, v: int, dtype: torch.dtype, ignore_frac: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(dtype)  # logits ~ N(0, 4) at T = 1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE_INDEX
    temperature = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(4.0), generator=g))
    return hidden, weight, labels, temperature


def run_logprobs(backend, hidden, weight, labels, temperature, coef_lp, coef_ent, move=None):
    """(logprobs, entropy, grad_hidden, grad_weight) for the scalar sum(coef_lp*logp + coef_ent*entropy).

    ``move``: the `on_backend_device` fixture; the inputs then go where ``backend`` runs (CUDA for triton on a GPU).
    """
    if move is not None:
        hidden, weight, labels, temperature, coef_lp, coef_ent = move(backend, hidden, weight, labels, temperature,
                                                                      coef_lp, coef_ent)
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, ent = linear_logprobs(h, w, labels, temperature, return_entropy=True, backend=backend)
    obj = (logp * coef_lp.to(logp.dtype)).sum()
    if coef_ent is not None:
        obj = obj + (ent * coef_ent.to(ent.dtype)).sum()
    obj.backward()
    return logp, ent, h.grad, w.grad


# --------------------------------------------------------------------------------------------------------------
# linear_logprobs
# --------------------------------------------------------------------------------------------------------------

LOGPROB_CASES = [
    ("torch", torch.float64, (37, 24, 1003)),
    ("torch", torch.float32, (37, 24, 1003)),
    ("torch", torch.float32, (61, 48, 517)),
    ("torch", torch.bfloat16, (37, 24, 1003)),
    ("torch", torch.float16, (23, 24, 1003)),
    pytest.param("triton", torch.float32, (37, 40, 257), marks=needs_triton),
    pytest.param("triton", torch.bfloat16, (29, 32, 257), marks=needs_triton),
]


@pytest.mark.parametrize("with_entropy_grad", [False, True])
@pytest.mark.parametrize(("backend", "dtype", "shape"), LOGPROB_CASES)
def test_logprobs_entropy_and_grads_match_reference(small_chunks, on_backend_device, backend, dtype, shape,
                                                    with_entropy_grad):
    n, h, v = shape
    hidden, weight, labels, temperature = make_inputs(n * 7 + h + int(with_entropy_grad), n, h, v, dtype)
    g = torch.Generator().manual_seed(1)
    coef_lp = torch.randn(n, generator=g)
    coef_ent = torch.randn(n, generator=g) if with_entropy_grad else None
    ref = run_logprobs("reference", hidden.double(), weight.double(), labels, temperature, coef_lp, coef_ent)
    out = run_logprobs(backend, hidden, weight, labels, temperature, coef_lp, coef_ent, move=on_backend_device)
    assert out[0].device.type == (on_backend_device(backend, hidden).device.type)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out[0].dtype == expected_dtype and out[1].dtype == expected_dtype
    assert out[2].dtype == dtype and out[3].dtype == dtype
    for name, o, r in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), out, ref):
        assert rel_err(o, r) < tol(dtype), f"{name}: {rel_err(o, r):.3g}"
    assert (out[0].cpu()[labels == IGNORE_INDEX] == 0).all()


def test_ignored_labels_get_zero_logprob_and_no_gradient(small_chunks):
    hidden, weight, labels, temperature = make_inputs(3, 23, 16, 1003, torch.float32, ignore_frac=0.4)
    ignored = labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    _, _, grad_h, _ = run_logprobs("torch", hidden, weight, labels, temperature, torch.ones(23), None)
    assert (grad_h[ignored] == 0).all()
    assert (grad_h[~ignored].abs().sum(dim=1) > 0).all()


def test_python_float_temperature_equals_broadcast_tensor(small_chunks):
    hidden, weight, labels, _ = make_inputs(4, 19, 16, 1003, torch.float32)
    a = linear_logprobs(hidden, weight, labels, 0.6, backend="torch")
    b = linear_logprobs(hidden, weight, labels, torch.full((19,), 0.6), backend="reference")
    assert rel_err(a, b) < FP32_TOL


def test_temperature_is_applied_per_row(small_chunks):
    """Row i must use T_i: scoring each row alone at its own scalar temperature gives the same values."""
    hidden, weight, labels, temperature = make_inputs(5, 9, 16, 1003, torch.float32, ignore_frac=0.0)
    batched = linear_logprobs(hidden, weight, labels, temperature, backend="torch")
    single = torch.stack([linear_logprobs(hidden[i:i + 1], weight, labels[i:i + 1], float(temperature[i]),
                                          backend="torch")[0] for i in range(9)])
    assert rel_err(batched, single) < FP32_TOL
    swapped = linear_logprobs(hidden, weight, labels, temperature.flip(0), backend="torch")
    assert rel_err(swapped, batched) > 1e-2  # the temperatures really matter


def test_auto_backend_is_torch_on_cpu(small_chunks):
    hidden, weight, labels, temperature = make_inputs(6, 13, 16, 1003, torch.float32)
    a = linear_logprobs(hidden, weight, labels, temperature)
    b = linear_logprobs(hidden, weight, labels, temperature, backend="torch")
    assert torch.equal(a, b)


def test_row_chunks_are_bounded_by_bytes_and_rows():
    # the byte budget binds for a large vocabulary, the row cap for a small one; bf16 computes in fp32
    assert chunked.chunk_rows(10**6, torch.float32) == chunked.ROW_CHUNK_BYTES // (4 * 10**6) < chunked.MAX_CHUNK_ROWS
    assert chunked.chunk_rows(1000, torch.float32) == chunked.MAX_CHUNK_ROWS == 256
    assert chunked.chunk_rows(151936, torch.bfloat16) == chunked.chunk_rows(151936, torch.float32) == 256
    assert chunked._Workspace(4096, 1000, torch.float32, torch.device("cpu")).buf.numel() == 256 * 1000


# --------------------------------------------------------------------------------------------------------------
# linear_grpo_loss
# --------------------------------------------------------------------------------------------------------------

def make_loss_inputs(seed, hidden, weight, labels, temperature, *, n_seqs=8, with_old=True, with_ref=True):
    """Packed per-token loss inputs; old/ref log-probs sit near the current policy so ratios straddle the clips."""
    n = hidden.shape[0]
    g = torch.Generator().manual_seed(seed)
    lp = linear_logprobs(hidden.double(), weight.double(), labels, temperature, backend="reference").float()
    seq_ids = torch.sort(torch.randint(0, n_seqs, (n,), generator=g) * 13 + 100).values  # labels, not 0..S-1
    seq_ids = seq_ids[torch.randperm(n, generator=g)]  # unsorted on purpose
    adv_per_seq = torch.randn(n_seqs * 13 + 100, generator=g)
    mask = (torch.rand(n, generator=g) > 0.25) & (labels != IGNORE_INDEX)
    return dict(
        advantages=adv_per_seq[seq_ids],
        mask=mask,
        seq_ids=seq_ids,
        # a few tokens whose old log-prob is far lower (ratio ~4.5) reach the dual-clip bound c = 3
        old_logprobs=(lp + 0.25 * torch.randn(n, generator=g) - 1.5 * (torch.rand(n, generator=g) < 0.3))
        if with_old else None,
        ref_logprobs=(lp + 0.25 * torch.randn(n, generator=g)) if with_ref else None,
        is_weights=torch.rand(n, generator=g) * 1.5 + 0.25,
        # the engine's log-probs: close to the learner's, with a few tokens far off so that masks reject some
        rollout_logprobs=lp + 0.3 * torch.randn(n, generator=g) + 1.2 * (torch.rand(n, generator=g) < 0.2),
    )


LOSS_OPTIONS = {
    "token_mean_on_policy": dict(loss_agg="token_mean", _old=False),
    "token_mean_k3": dict(loss_agg="token_mean", kl_beta=0.05, kl_estimator="k3"),
    "seq_mean_token_mean_k1": dict(loss_agg="seq_mean_token_mean", kl_beta=0.1, kl_estimator="k1"),
    "seq_mean_token_sum_norm_k2_dualclip_is": dict(loss_agg="seq_mean_token_sum_norm", max_len=17, kl_beta=0.2,
                                                   kl_estimator="k2", dual_clip=3.0, _is=True, eps_high=0.2),
    "gspo": dict(ratio_level="sequence", loss_agg="seq_mean_token_mean", kl_beta=0.05, eps_low=3e-4, eps_high=4e-4),
    "gspo_on_policy_is": dict(ratio_level="sequence", _old=False, _is=True),
    "cispo": dict(loss_type="cispo", cispo_eps_low=0.2, cispo_eps_high=0.3, kl_beta=0.05, _rollout=True),
    "cispo_on_policy_seq_mean": dict(loss_type="cispo", loss_agg="seq_mean_token_mean", _old=False),
    # IS weights from rollout_logprobs, learner side = this call's own log-probs (computed chunk by chunk)
    "icepop_on_policy": dict(_old=False, _rollout=True, is_level="token", is_clip=5.0, is_mask="token",
                             is_mask_low=0.6, is_mask_high=1.5),
    # sequence-level mask from on-policy log-probs: the extra-pass path
    "seq_mask_tis_on_policy": dict(_old=False, _rollout=True, is_level="token", is_clip=1.3, is_mask="sequence",
                                   is_mask_low=0.8, is_mask_high=1.25, loss_agg="seq_mean_token_mean"),
    # learner side = old_logprobs, known before the pass
    "cispo_seq_is_token_mask": dict(loss_type="cispo", _rollout=True, is_level="sequence", is_clip=1.5,
                                    is_mask="token", is_mask_low=0.5, is_mask_high=1.4),
    "gspo_seq_mask_on_policy": dict(ratio_level="sequence", _old=False, _rollout=True, is_mask="sequence",
                                    is_mask_low=0.8, is_mask_high=1.25),
}


def loss_call(backend, hidden, weight, labels, temperature, inputs, options, grad_scale=1.0, move=None):
    opts = {k: v for k, v in options.items() if not k.startswith("_")}
    if move is not None:  # the `on_backend_device` fixture: inputs where the backend runs
        hidden, weight, labels, temperature = move(backend, hidden, weight, labels, temperature)
        inputs = dict(zip(inputs, move(backend, *inputs.values())))
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss, metrics = linear_grpo_loss(
        h, w, labels, temperature, inputs["advantages"], inputs["mask"],
        old_logprobs=inputs["old_logprobs"] if options.get("_old", True) else None,
        ref_logprobs=inputs["ref_logprobs"], is_weights=inputs["is_weights"] if options.get("_is") else None,
        rollout_logprobs=inputs["rollout_logprobs"] if options.get("_rollout") else None,
        seq_ids=inputs["seq_ids"], backend=backend, **opts)
    (loss * grad_scale).backward()
    return loss, metrics, h.grad, w.grad


def check_loss_against_reference(backend, dtype, shape, option_name, seed, grad_scale=1.0, move=None):
    n, h, v = shape
    hidden, weight, labels, temperature = make_inputs(seed, n, h, v, dtype)
    inputs = make_loss_inputs(seed + 1, hidden, weight, labels, temperature)
    options = LOSS_OPTIONS[option_name]
    ref = loss_call("reference", hidden.double(), weight.double(), labels, temperature, inputs, options, grad_scale)
    out = loss_call(backend, hidden, weight, labels, temperature, inputs, options, grad_scale, move)
    assert out[0].dim() == 0 and torch.isfinite(out[0])
    assert abs(out[0].item() - ref[0].item()) <= tol(dtype) * max(abs(ref[0].item()), 1e-2)
    for name, o, r in zip(("grad_hidden", "grad_weight"), out[2:], ref[2:]):
        assert o.dtype == dtype
        assert rel_err(o, r) < tol(dtype), f"{name}: {rel_err(o, r):.3g}"
    assert set(ref[1]) <= set(out[1]) and "entropy_mean" in out[1]
    assert set(out[1]) == set(ref[1])
    floats = ["kl_mean", "entropy_mean", "ratio_mean", "ratio_max"]
    floats += [k for k in ref[1] if k.startswith("mismatch_") and k != "mismatch_tokens"]
    for key in floats:
        assert math.isclose(out[1][key], ref[1][key], rel_tol=tol(dtype) * 10, abs_tol=tol(dtype)), key
    if "mismatch_tokens" in ref[1]:
        assert out[1]["mismatch_tokens"] == ref[1]["mismatch_tokens"] == int(inputs["mask"].sum())
    if dtype != torch.bfloat16:  # clip and mask decisions of bf16 runs may flip at a boundary
        for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "is_mask_frac"):
            if key in ref[1]:
                assert out[1][key] == pytest.approx(ref[1][key], abs=1e-6), key  # a flip would be >= 1/N
        if "is_weight_mean" in ref[1]:
            # (explicit is_weights are float32 inputs, summed in each backend's own precision)
            rel = max(tol(dtype) * 10, 1e-6)
            assert out[1]["is_weight_mean"] == pytest.approx(ref[1]["is_weight_mean"], rel=rel)
    return ref


@pytest.mark.parametrize("option_name", list(LOSS_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grpo_loss_torch_backend_matches_reference(small_chunks, option_name, dtype):
    check_loss_against_reference("torch", dtype, (53, 24, 1003), option_name, seed=11 + len(option_name))


@pytest.mark.parametrize("option_name", ["token_mean_k3", "seq_mean_token_sum_norm_k2_dualclip_is", "gspo"])
def test_grpo_loss_torch_backend_bf16(small_chunks, option_name):
    check_loss_against_reference("torch", torch.bfloat16, (53, 32, 1003), option_name, seed=3)


def test_grpo_loss_options_are_exercised(small_chunks):
    """The chosen inputs really hit the clip regions, dual clip and the KL term (else the checks above are weak)."""
    ref = check_loss_against_reference("torch", torch.float64, (53, 24, 1003),
                                       "seq_mean_token_sum_norm_k2_dualclip_is", seed=5)
    metrics = ref[1]
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    assert metrics["dual_clip_frac"] > 0 and metrics["kl_mean"] > 0
    gspo = check_loss_against_reference("torch", torch.float64, (53, 24, 1003), "gspo", seed=5)[1]
    assert gspo["clip_frac"] > 0


def test_rollout_correction_options_are_exercised(small_chunks):
    """CISPO clips on both sides and the IS masks reject some, not all, tokens (else the checks above are weak)."""
    def metrics(name):
        return check_loss_against_reference("torch", torch.float64, (53, 24, 1003), name, seed=5)[1]

    cispo = metrics("cispo")
    assert cispo["clip_frac_low"] > 0 and cispo["clip_frac_high"] > 0
    for name in ("icepop_on_policy", "seq_mask_tis_on_policy", "cispo_seq_is_token_mask", "gspo_seq_mask_on_policy"):
        assert 0 < metrics(name)["is_mask_frac"] < 0.9, name


def test_icepop_equals_hand_written_weights(small_chunks):
    """IS weights taken from rollout_logprobs inside the fused pass equal explicit, independently written weights."""
    hidden, weight, labels, temperature = make_inputs(31, 47, 24, 1003, torch.float64)
    inputs = make_loss_inputs(32, hidden, weight, labels, temperature)
    lp = linear_logprobs(hidden, weight, labels, temperature, backend="reference")
    ratio = torch.exp(lp - inputs["rollout_logprobs"].double())
    hand = torch.where((ratio >= 0.6) & (ratio <= 1.5), ratio.clamp(max=5.0), torch.zeros_like(ratio))
    icepop = dict(_old=False, loss_type="cispo", _rollout=True, is_level="token", is_clip=5.0, is_mask="token",
                  is_mask_low=0.6, is_mask_high=1.5)
    out = loss_call("torch", hidden, weight, labels, temperature, inputs, icepop)
    ref = loss_call("torch", hidden, weight, labels, temperature, dict(inputs, is_weights=hand),
                    dict(_old=False, loss_type="cispo", _is=True))
    assert abs(out[0].item() - ref[0].item()) <= 1e-10 * abs(ref[0].item())
    for o, r in zip(out[2:], ref[2:]):
        assert rel_err(o, r) < 1e-10
    with pytest.raises(ValueError, match="need rollout_logprobs"):
        loss_call("torch", hidden, weight, labels, temperature, inputs, dict(icepop, _rollout=False))
    with pytest.raises(ValueError, match="either is_weights or an IS correction"):
        loss_call("reference", hidden, weight, labels, temperature, inputs, dict(icepop, _is=True))
    bad = dict(inputs, rollout_logprobs=inputs["rollout_logprobs"].masked_fill(inputs["mask"], float("nan")))
    with pytest.raises(ValueError, match="must be finite"):
        loss_call("torch", hidden, weight, labels, temperature, bad, icepop)
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        loss_call("torch", hidden, weight, labels, temperature, inputs, dict(icepop, is_mask_low=1.2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_mismatch_metrics_at_the_rows_own_temperature(small_chunks, on_backend_device, backend):
    """Rollout log-probs taken at each row's temperature: ~0 mismatch when scored at the same per-row temperatures,
    clearly non-zero for a scalar-temperature scorer, and exactly the planted perturbation when one is planted."""
    hidden, weight, labels, temperature = make_inputs(41, 37, 40, 257, torch.float32, ignore_frac=0.0)
    rollout = linear_logprobs(hidden.double(), weight.double(), labels, temperature, backend="reference").float()
    adv, mask = torch.randn(37), torch.ones(37, dtype=torch.bool)

    def mismatch(temp, roll):
        temp = on_backend_device(backend, temp) if isinstance(temp, torch.Tensor) else temp
        args = on_backend_device(backend, hidden, weight, labels, adv, mask, roll)
        _, m = linear_grpo_loss(*args[:3], temp, *args[3:5], rollout_logprobs=args[5], backend=backend)
        return m

    same = mismatch(temperature, rollout)
    assert same["mismatch_tokens"] == 37
    assert same["mismatch_logp_abs_max"] < 1e-4 and same["mismatch_kl_k3"] < 1e-8
    assert same["mismatch_ratio_outside_frac"] == 0.0
    scalar = mismatch(1.0, rollout)  # what a trainer that ignores the per-row temperature would measure
    assert scalar["mismatch_logp_abs_mean"] > 0.5 and scalar["mismatch_ratio_outside_frac"] > 0.2
    planted = rollout.clone()
    planted[::4] -= 1.0  # the engine under-reports 10 of 37 tokens by 1 nat
    m = mismatch(temperature, planted)
    assert m["mismatch_logp_abs_mean"] == pytest.approx(10 / 37, abs=1e-4)
    assert m["mismatch_logp_abs_max"] == pytest.approx(1.0, abs=1e-4)
    assert m["mismatch_kl_k3"] == pytest.approx(10 / 37 * (math.e - 2.0), abs=1e-4)
    assert m["mismatch_ratio_outside_frac"] == pytest.approx(10 / 37)


def test_grpo_loss_scales_gradients_by_grad_output(small_chunks):
    check_loss_against_reference("torch", torch.float32, (41, 24, 1003), "token_mean_k3", seed=7, grad_scale=-2.5)


@pytest.mark.parametrize(("option_name", "dtype"), [
    ("token_mean_k3", torch.float32),
    ("seq_mean_token_sum_norm_k2_dualclip_is", torch.float32),
    ("gspo", torch.float32),
    ("token_mean_on_policy", torch.bfloat16),
    ("cispo", torch.float32),
    ("icepop_on_policy", torch.float32),
    ("seq_mask_tis_on_policy", torch.float32),
    ("cispo_seq_is_token_mask", torch.bfloat16),
])
@needs_triton
def test_grpo_loss_triton_backend_matches_reference(small_chunks, on_backend_device, option_name, dtype):
    check_loss_against_reference("triton", dtype, (37, 40, 257), option_name, seed=21, move=on_backend_device)


def test_grpo_loss_frozen_weight_and_no_grad(small_chunks):
    hidden, weight, labels, temperature = make_inputs(8, 31, 16, 1003, torch.float32)
    inputs = make_loss_inputs(9, hidden, weight, labels, temperature)
    kwargs = dict(old_logprobs=inputs["old_logprobs"], ref_logprobs=inputs["ref_logprobs"], kl_beta=0.1)
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, weight, labels, temperature, inputs["advantages"], inputs["mask"],
                               backend="torch", **kwargs)
    loss.backward()
    h_ref = hidden.double().requires_grad_(True)
    loss_ref, metrics_ref = linear_grpo_loss(h_ref, weight.double(), labels, temperature, inputs["advantages"],
                                             inputs["mask"], backend="reference", **kwargs)
    loss_ref.backward()
    assert rel_err(h.grad, h_ref.grad) < FP32_TOL
    with torch.no_grad():
        loss_ng, metrics_ng = linear_grpo_loss(hidden, weight, labels, temperature, inputs["advantages"],
                                               inputs["mask"], backend="torch", **kwargs)
    assert not loss_ng.requires_grad
    assert loss_ng.item() == pytest.approx(loss_ref.item(), rel=FP32_TOL)
    assert metrics_ng["entropy_mean"] == pytest.approx(metrics_ref["entropy_mean"], rel=FP32_TOL)


def test_grpo_loss_masked_garbage_does_not_leak(small_chunks):
    """Masked-out tokens may carry inf/NaN old/ref log-probs (prompt tokens): no NaN in loss or gradients."""
    hidden, weight, labels, temperature = make_inputs(10, 29, 16, 1003, torch.float32)
    inputs = make_loss_inputs(11, hidden, weight, labels, temperature)
    off = ~inputs["mask"]
    assert off.any()
    old = inputs["old_logprobs"].masked_fill(off, float("-inf"))
    ref_lp = inputs["ref_logprobs"].masked_fill(off, float("nan"))
    results = []
    for backend, dt in (("reference", torch.float64), ("torch", torch.float32)):
        h = hidden.to(dt).requires_grad_(True)
        w = weight.to(dt).requires_grad_(True)
        loss, _ = linear_grpo_loss(h, w, labels, temperature, inputs["advantages"], inputs["mask"],
                                   old_logprobs=old, ref_logprobs=ref_lp, kl_beta=0.1, backend=backend)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(results[0], results[1]):
        assert rel_err(b, a) < FP32_TOL


def test_grpo_loss_backward_runs_once(small_chunks):
    hidden, weight, labels, temperature = make_inputs(12, 17, 16, 1003, torch.float32)
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, weight, labels, temperature, torch.randn(17), torch.ones(17), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels, temperature = make_inputs(13, 8, 16, 50, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_logprobs(hidden, weight, labels, 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_logprobs(hidden, weight, labels, temperature.clone().index_fill_(0, torch.tensor([3]), -1.0))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_logprobs(hidden, weight, labels, temperature.clone().index_fill_(0, torch.tensor([3]), math.nan))
    with pytest.raises(ValueError, match="temperature must be a float or a tensor of shape"):
        linear_logprobs(hidden, weight, labels, temperature[:5])
    with pytest.raises(ValueError, match="labels must be in"):
        linear_logprobs(hidden, weight, labels.clone().index_fill_(0, torch.tensor([0]), 50), temperature)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_logprobs(hidden, weight, labels.clone().index_fill_(0, torch.tensor([0]), -3), temperature)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        linear_logprobs(hidden, weight, labels.float(), temperature)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_logprobs(hidden, weight[:, :8], labels, temperature)
    with pytest.raises(ValueError, match="weight dtype"):
        linear_logprobs(hidden, weight.double(), labels, temperature)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        linear_logprobs(hidden[None], weight, labels, temperature)
    with pytest.raises(ValueError, match="unknown backend"):
        linear_logprobs(hidden, weight, labels, temperature, backend="cuda")
    adv, mask = torch.randn(8), torch.ones(8)
    with pytest.raises(ValueError, match="advantages must be 1-D"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv[:7], mask)
    with pytest.raises(ValueError, match="unknown loss_agg"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv, mask, loss_agg="sum")
    with pytest.raises(ValueError, match="needs seq_ids"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv, mask, loss_agg="seq_mean_token_mean")
    with pytest.raises(ValueError, match="needs seq_ids"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv, mask, ratio_level="sequence")
    with pytest.raises(ValueError, match="unknown kl"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip"):
        linear_grpo_loss(hidden, weight, labels, temperature, adv, mask, dual_clip=0.5)


# --------------------------------------------------------------------------------------------------------------
# Triton: a new temperature must not recompile
# --------------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the gpu test checks the real compile cache")
def test_new_temperature_does_not_change_the_triton_compile_key(small_chunks):
    """Capture the exact arguments our launcher passes to the Triton kernels and feed them to Triton's own
    specialisation binder (the one `JITFunction.run` uses to build its compile-cache key): calls with different
    temperature values must map to the same keys. The interpreter itself never compiles, so this applies the
    compile path's own logic to the real launch arguments."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from erpo_fast.kernels.fused_linear import triton_kernels

    hidden, weight, labels, temperature = make_inputs(14, 37, 40, 257, torch.float32)
    inputs = make_loss_inputs(15, hidden, weight, labels, temperature)

    def launch_keys(kernel, binder, hidden_in, temp):
        launches = []

        def record(*args, **kwargs):
            launches.append((args, kwargs))

        kernel.add_pre_run_hook(record)
        try:
            h = hidden_in.clone().requires_grad_(True)
            loss, _ = linear_grpo_loss(h, weight.to(hidden_in.dtype), labels, temp, inputs["advantages"],
                                       inputs["mask"], old_logprobs=inputs["old_logprobs"], backend="triton")
            loss.backward()
        finally:
            kernel.pre_run_hooks.remove(record)
        return {compute_cache_key({}, *binder(*a, **k)[1:]) for a, k in launches}

    for kernel in (triton_kernels._logits_stats_kernel, triton_kernels._grad_logits_kernel):
        jit = JITFunction(kernel.fn)  # the compiling wrapper of the same Python function
        assert not any(p.is_constexpr for p in jit.params if "inv_t" in p.name or "coef" in p.name)
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        keys = [launch_keys(kernel, binder, hidden, t) for t in (temperature, temperature.flip(0) * 1.7, 0.3)]
        assert keys[0] and keys[0] == keys[1] == keys[2]
        # the keys do see real specialisations: a bf16 launch gets different ones
        assert launch_keys(kernel, binder, hidden.bfloat16(), temperature).isdisjoint(keys[0])


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the gpu test checks the real compile cache")
def test_new_row_count_does_not_change_the_triton_compile_key(small_chunks):
    """Chunk remainders (n_rows), split counts and split widths are runtime integers: N = 32, 33, 37 and 48
    (16-row chunks, so remainders 16, 1, 5) launch each kernel with one compile key. Negative control: the same
    launches bound without `do_not_specialize` give several keys, so the check can fail."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from erpo_fast.kernels.fused_linear import triton_kernels

    def launches(kernel, n):
        hidden, weight, labels, temperature = make_inputs(30 + n, n, 40, 257, torch.float32)
        record = []
        hook = lambda *a, **k: record.append((a, k))
        kernel.add_pre_run_hook(hook)
        try:
            loss, _ = linear_grpo_loss(hidden.requires_grad_(True), weight, labels, temperature, torch.randn(n),
                                       torch.ones(n, dtype=torch.bool), backend="triton")
            loss.backward()
        finally:
            kernel.pre_run_hooks.remove(hook)
        return record

    for kernel in (triton_kernels._logits_stats_kernel, triton_kernels._grad_logits_kernel):
        calls = [c for n in (32, 33, 37, 48) for c in launches(kernel, n)]
        assert {c[0][6] if kernel is triton_kernels._logits_stats_kernel else c[0][7] for c in calls} >= {16, 1}

        def keys(do_not_specialize, kernel=kernel, calls=calls):
            jit = JITFunction(kernel.fn, do_not_specialize=do_not_specialize)
            binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
            return {compute_cache_key({}, *binder(*a, **k)[1:]) for a, k in calls}

        assert len(keys(kernel.kwargs["do_not_specialize"])) == 1
        assert len(keys(None)) > 1


def test_split_plan_never_adds_a_nearly_empty_wave():
    """Programs (row blocks x vocabulary splits) fit PROGRAMS_PER_SM waves on the SMs, cover the vocabulary
    once, and fill at least half of those waves while there are fewer row blocks than wave slots."""
    from erpo_fast.kernels.fused_linear import triton_kernels as tk

    vocab, block_n, sms = 151936, 128, 132
    slots = tk.PROGRAMS_PER_SM * sms
    for row_blocks in range(1, 700):
        v_per_split, n_splits = tk.split_plan(row_blocks, vocab, block_n, sms)
        assert v_per_split % block_n == 0
        assert (n_splits - 1) * v_per_split < vocab <= n_splits * v_per_split
        programs = row_blocks * n_splits
        if row_blocks <= slots:
            assert slots // 2 < programs <= slots, row_blocks
        else:
            assert n_splits == 1
    assert tk.split_plan(14, vocab, block_n, sms) == (4224, 36)  # 504 programs: 4 waves, not 5


def test_chunk_budget_by_device(monkeypatch):
    """CPU: the fixed budget. CUDA: 1/32 of the card within [1, 4] GiB and at most a quarter of the free memory
    (checked against faked device queries); the budget counts the low-precision gradient buffer too."""
    from types import SimpleNamespace

    from erpo_fast.kernels.fused_linear import triton_kernels as tk

    monkeypatch.setattr(tk, "ROW_CHUNK_BYTES", None)
    assert tk.chunk_bytes(torch.device("cpu")) == tk.CPU_CHUNK_BYTES
    gib = 1 << 30
    for total, free, want in [(80 * gib, 70 * gib, int(2.5 * gib)), (141 * gib, 130 * gib, 4 * gib),
                              (80 * gib, 6 * gib, int(1.5 * gib)), (16 * gib, 2 * gib, gib)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, t=total: SimpleNamespace(total_memory=t))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d, f=free, t=total: (f, t))
        assert tk.chunk_bytes(torch.device("cuda")) == want
    monkeypatch.setattr(tk, "ROW_CHUNK_BYTES", 12345)
    assert tk.chunk_bytes(torch.device("cuda")) == 12345
    # 7B head, N = 8192, bf16 on an 80 GB card: 2944 rows per chunk (3 chunks, not the 5 of a 1 GiB budget)
    assert tk._chunk_rows(151936, 8192, int(2.5 * gib), 4 + 2) == 2944


def test_low_precision_accumulate_mode_is_probed_once_and_errors_propagate(monkeypatch):
    """The mode comes from a probe on a tiny matmul; a failing real call (an out-of-memory, say) raises and
    leaves the mode alone. (The old code dropped to a slower mode for the rest of the process on any error.)"""
    from erpo_fast.kernels.fused_linear import triton_kernels as tk

    monkeypatch.setattr(tk, "_ACC_MODE", {})
    mode = tk.acc_mode(torch.device("cpu"))
    assert mode in tk.LOWP_ACC_MODES and tk._ACC_MODE["cpu"] == mode and len(tk._ACC_MODE) == 1
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(24, 16, generator=g).bfloat16()
    out = torch.empty(40, 16)
    tk._mm_accumulate_(out, a, b, first=True)
    tk._mm_accumulate_(out, a, b, first=False)
    ref = 2 * (a.double() @ b.double())
    assert rel_err(out, ref) < 1e-6  # fp32 accumulation of exact bf16 products

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch, "mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        tk._mm_accumulate_(out, a, b, first=True)
    assert tk._ACC_MODE["cpu"] == mode and len(tk._ACC_MODE) == 1


@pytest.fixture
def restore_tf32_flags():
    matmul = torch.backends.cuda.matmul
    saved = (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None))
    yield
    if saved[0] is not None:
        matmul.fp32_precision = saved[0]
        torch.backends.fp32_precision = saved[1]
    else:
        matmul.allow_tf32 = False


@needs_triton
@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_tf32_flag_is_read_through_the_new_api(small_chunks, on_backend_device, restore_tf32_flags):
    """vLLM's worker sets the new `fp32_precision`; torch then raises on a read of the legacy `allow_tf32`. The
    kernels read the new flag (and its "none" = inherit the global flag), so an fp32 call works after it."""
    from erpo_fast.kernels.fused_linear import triton_kernels as tk

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="legacy and new APIs"):  # what the old read hit
        _ = matmul.allow_tf32
    assert tk._dot_precision(torch.float32) == "tf32" and tk._dot_precision(torch.bfloat16) == "tf32"
    matmul.fp32_precision = "ieee"
    assert tk._dot_precision(torch.float32) == "ieee"
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert tk._dot_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "ieee"
    matmul.allow_tf32 = True  # the legacy setter still counts
    assert tk._dot_precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"
    hidden, weight, labels, temperature = make_inputs(3, 21, 40, 257, torch.float32)
    coef = torch.randn(21, generator=torch.Generator().manual_seed(4))
    out = run_logprobs("triton", hidden, weight, labels, temperature, coef, None, move=on_backend_device)
    ref = run_logprobs("reference", hidden.double(), weight.double(), labels, temperature, coef, None)
    assert rel_err(out[0], ref[0]) < FP32_TOL


@pytest.mark.gpu
def test_new_temperature_does_not_recompile_on_gpu():
    from erpo_fast.kernels.fused_linear import triton_kernels

    hidden, weight, labels, temperature = (t.cuda() for t in make_inputs(16, 300, 64, 1003, torch.float32))

    def cache_sizes():
        return [sum(len(c[0]) for c in k.device_caches.values())
                for k in (triton_kernels._logits_stats_kernel, triton_kernels._grad_logits_kernel)]

    def step(temp):
        h = hidden.clone().requires_grad_(True)
        loss, _ = linear_grpo_loss(h, weight, labels, temp, torch.randn(300, device="cuda"),
                                   torch.ones(300, device="cuda"), backend="triton")
        loss.backward()
        torch.cuda.synchronize()

    step(temperature)
    before = cache_sizes()
    step(temperature.flip(0) * 1.3)
    step(0.7)
    assert cache_sizes() == before


# --------------------------------------------------------------------------------------------------------------
# Peer parity: Liger's fused linear GRPO loss at a scalar temperature
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_old", [True, False])
def test_token_mean_loss_equals_liger_dapo(with_old):
    """Liger's layout is [B, S] with per-sequence advantages and an attention mask; its "dapo" loss divides by
    the number of unmasked tokens in the batch, its KL is k3 against ref_per_token_logps, and old=None means
    detached current log-probs. Our packed layout: N = B*S tokens, advantages repeated per token."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    b, s, h, v, temp, beta = 3, 7, 32, 301, 0.7, 0.05
    hidden, weight, _, _ = make_inputs(17, b * s, h, v, torch.float32)
    g = torch.Generator().manual_seed(18)
    ids = torch.randint(0, v, (b, s), generator=g)
    attn = torch.ones(b, s)
    attn[0, 5:] = 0
    attn[2, 3:] = 0
    adv = torch.randn(b, generator=g)
    lp = linear_logprobs(hidden, weight, ids.reshape(-1), temp, backend="reference").reshape(b, s)
    old = lp + 0.25 * torch.randn(b, s, generator=g) if with_old else None
    ref_lp = lp + 0.25 * torch.randn(b, s, generator=g)

    x_l = hidden.reshape(b, s, h).clone().requires_grad_(True)
    w_l = weight.clone().requires_grad_(True)
    module = liger.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, epsilon_low=0.2,
                                            epsilon_high=0.28, loss_type="dapo", temperature=temp)
    loss_l, metrics_l = module(x_l, w_l, ids, attn, adv, ref_per_token_logps=ref_lp, old_per_token_logps=old)
    loss_l.backward()

    x_o = hidden.clone().requires_grad_(True)
    w_o = weight.clone().requires_grad_(True)
    loss_o, metrics_o = linear_grpo_loss(
        x_o, w_o, ids.reshape(-1), temp, adv[:, None].expand(b, s).reshape(-1), attn.reshape(-1),
        old_logprobs=None if old is None else old.reshape(-1), ref_logprobs=ref_lp.reshape(-1), kl_beta=beta,
        kl_estimator="k3", eps_low=0.2, eps_high=0.28, loss_agg="token_mean", backend="torch")
    loss_o.backward()

    assert loss_o.item() == pytest.approx(loss_l.item(), rel=1e-5, abs=1e-7)
    assert rel_err(x_o.grad, x_l.grad.reshape(-1, h)) < FP32_TOL
    assert rel_err(w_o.grad, w_l.grad) < FP32_TOL
    kl_l, clip_l = (m.item() for m in metrics_l)
    assert metrics_o["kl_mean"] == pytest.approx(kl_l, rel=1e-5)
    assert metrics_o["clip_frac"] == pytest.approx(clip_l, abs=1e-6)
    if with_old:
        assert clip_l > 0  # the comparison covers clipped tokens
