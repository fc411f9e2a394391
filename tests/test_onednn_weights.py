"""The CPU decode's oneDNN matmuls (erpo_fast/engines/onednn_weights.py) against float64 references, and the native
engine's use of them: packed per call, dropped after it, never stale, the same samples as ``F.linear``'s."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_causal_lm

from erpo_fast.engines import NativeEngine
from erpo_fast.engines import native as native_engine
from erpo_fast.engines.onednn_weights import linear, onednn_available, pack, packed_linear

pytestmark = pytest.mark.skipif(not onednn_available(torch.float32), reason="this torch build has no oneDNN linear")


def _float64_reference(x, weight, bias):
    """The product in float64 and the forward-error bound of an fp32-accumulated dot product of length K
    (K * 2^-24 * sum |x_k w_k|, the worst case of recursive summation)."""
    x64, w64 = x.double(), weight.double()
    out = F.linear(x64, w64, None if bias is None else bias.double())
    bound = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    return out, bound * weight.shape[1] * 2.0**-24


@pytest.mark.parametrize("rows,k,n", [(1, 64, 96), (7, 96, 200), (32, 576, 1536), (130, 256, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_fp32_is_the_product_within_fp32_rounding(rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows + k)
    x, weight = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = packed_linear(x, pack(weight), bias)
    want, bound = _float64_reference(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert ((got.double() - want).abs() <= bound).all()


def test_packed_linear_takes_3d_and_strided_inputs():
    # The prefill passes [prompts, length, hidden]; attention outputs reach o_proj as reshaped views.
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    packed = pack(weight)
    x3 = torch.randn(3, 5, 40, generator=g)
    strided = torch.randn(40, 6, generator=g).T  # [6, 40], not contiguous
    for x in (x3, strided):
        want, bound = _float64_reference(x, weight, bias)
        got = packed_linear(x, packed, bias)
        assert got.shape == want.shape and ((got.double() - want).abs() <= bound).all()


def test_packed_linear_bf16_rounds_once_at_the_output():
    if not onednn_available(torch.bfloat16):
        pytest.skip("no bf16 oneDNN linear here")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 256, generator=g).bfloat16()
    weight = torch.randn(320, 256, generator=g).bfloat16()
    got = packed_linear(x, pack(weight), None)
    want, bound = _float64_reference(x, weight, None)  # exact products of the bf16 inputs, fp32 accumulation
    assert got.dtype == torch.bfloat16
    # bf16 output: half an ulp (2^-8 relative) of rounding on top of the fp32 accumulation's bound
    assert ((got.double() - want).abs() <= bound + want.abs() * 2.0**-8).all()


def test_availability_is_per_dtype_and_the_fallback_is_f_linear():
    assert not onednn_available(torch.float64)  # the engine's float64 test models keep F.linear
    g = torch.Generator().manual_seed(7)
    x, weight, bias = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    assert torch.equal(linear(x, weight, bias, None), F.linear(x, weight, bias))


# ---- the native engine ---------------------------------------------------------------------------


PROMPTS = [[5, 9, 17, 33, 2], [40, 41], [7, 7, 8, 90, 12, 3, 4]]


def _sample(engine):
    return engine.generate(PROMPTS, [1.0, 0.7, 1.3], n=3, max_new_tokens=10, stop_token_ids=[], seed=[1, 2, 3])


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_engine_samples_as_with_f_linear_and_packs_only_during_a_call(kind, monkeypatch):
    packed_shapes = []

    def counting_pack(weight):
        packed_shapes.append(tuple(weight.shape))
        return pack(weight)

    monkeypatch.setattr(native_engine, "pack", counting_pack)
    packed = NativeEngine(tiny_causal_lm(kind))
    plain = NativeEngine(tiny_causal_lm(kind), pack_weights=False)
    got, want = _sample(packed), _sample(plain)
    model = packed.model
    layers = model.config.num_hidden_layers
    # q/k/v fused, gate/up fused, o, down per layer, and the LM head: once per call
    assert len(packed_shapes) == 4 * layers + 1
    assert packed_shapes[-1] == tuple(model.lm_head.weight.shape)
    runner = packed.runner
    assert runner.lm_head_packed is None and all(layer.packed == {} for layer in runner.layers)
    for group_got, group_want in zip(got, want):
        for a, b in zip(group_got, group_want):
            assert a.token_ids == b.token_ids
            assert max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs)) < 1e-5
    _sample(packed)
    assert len(packed_shapes) == 2 * (4 * layers + 1)


def test_engine_sees_in_place_weight_updates_between_calls():
    # The learner's optimizer updates shared parameters in place; the next call must sample from the new weights.
    model, reference = tiny_causal_lm("qwen3"), tiny_causal_lm("qwen3")
    engine = NativeEngine(model)
    before = _sample(engine)
    with torch.no_grad():
        for m in (model, reference):
            for p in m.parameters():
                p.mul_(1.5).add_(0.01)
    after = _sample(engine)
    fresh = _sample(NativeEngine(reference, pack_weights=False))
    assert [[s.token_ids for s in g] for g in after] != [[s.token_ids for s in g] for g in before]
    for group_after, group_fresh in zip(after, fresh):
        for a, b in zip(group_after, group_fresh):
            assert a.token_ids == b.token_ids
            assert max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs)) < 1e-4


def test_memory_plan_counts_the_packed_weights_the_engine_packs(monkeypatch):
    from erpo_fast.config import Config
    from erpo_fast.memory_plan import ModelShape, plan_memory

    model = tiny_causal_lm("qwen3")
    packed_bytes = []
    monkeypatch.setattr(native_engine, "pack", lambda w: packed_bytes.append(w.numel() * w.element_size()) or pack(w))
    NativeEngine(model).generate([[1, 2, 3]], [1.0], n=1, max_new_tokens=2, stop_token_ids=[])
    shape = ModelShape.from_config(model.config)
    name = "engine packed weights (oneDNN, while sampling)"
    cfg = Config()
    plan = plan_memory(cfg, shape, device=torch.device("cpu"), prompt_tokens=16)
    assert plan.terms[name] == sum(packed_bytes)
    cfg.rollout.pack_weights = False
    assert name not in plan_memory(cfg, shape, device=torch.device("cpu"), prompt_tokens=16).terms
