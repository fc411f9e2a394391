"""The lean norm / SwiGLU backward (erpo_fast.lean_layers) against independent references: transformers' own
modules (the forward bit for bit, the gradients to fp32 rounding; SwiGLU's bit for bit), float64 autograd of the
plain expressions, and autograd's saved tensors (what each swap saves)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import saved_tensor_bytes
from erpo_fast.lean_layers import (
    LEAN_MODEL_TYPES,
    RMSNormFunction,
    SiluMulFunction,
    SwiGLUDownFunction,
    apply_lean_layers,
    folds_down_projection,
    has_lean_layers,
)

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny(model_type: str, **over):
    config = AutoConfig.for_model(model_type, **{**TINY, **over})
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        for name, p in model.named_parameters():  # norms away from 1, so a wrong weight gradient shows
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
    return model


def _loss_and_grads(model, ids, weights, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = (logits * weights).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logits.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("model_type", sorted(LEAN_MODEL_TYPES))
def test_same_forward_and_gradients_as_transformers(model_type, autocast):
    reference = tiny(model_type)
    lean = copy.deepcopy(reference)
    layers = reference.config.num_hidden_layers
    norms = layers * 2 + 1 + (layers * 2 if model_type == "qwen3" else 0)  # qwen3: q_norm and k_norm too
    assert apply_lean_layers(lean) == norms + layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g)
    weights = torch.randn(2, 24, 97, generator=g)
    ref_logits, ref_grads = _loss_and_grads(reference, ids, weights, autocast)
    logits, grads = _loss_and_grads(lean, ids, weights, autocast)
    assert torch.equal(logits, ref_logits)  # the forward is transformers' expression, bit for bit
    for (name, _), a, b in zip(reference.named_parameters(), grads, ref_grads):
        scale = b.abs().max().item() + 1e-12
        # fp32: rounding of the norm's closed form only; bf16: those fp32 differences reach the bf16 matmuls
        tol = 2e-2 if autocast else 1e-5
        assert (a - b).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("shape", [(3, 7, 16), (1, 5, 4, 8)])  # [B, T, H]; qwen3's per-head [B, T, heads, D]
def test_rms_norm_backward_is_exact_in_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.empty(shape[-1], dtype=torch.float64).uniform_(0.5, 1.5, generator=g).requires_grad_()
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = 1e-6
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # float64 all the way
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, w), grad_out)
    out = RMSNormFunction.apply(x, w, eps)
    gx, gw = torch.autograd.grad(out, (x, w), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_silu_mul_backward_is_autograds(dtype):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(6, 40, generator=g).to(dtype).requires_grad_()
    up = torch.randn(6, 40, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(6, 40, generator=g).to(dtype)
    ref_grads = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad_out)
    grads = torch.autograd.grad(SiluMulFunction.apply(gate, up), (gate, up), grad_out)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)  # the same ops autograd runs, so the same bits


def _saved_bytes(module, x):
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    return saved_tensor_bytes(lambda: module(x), exclude=exclude)[0]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_what_each_swap_no_longer_keeps(autocast):
    model = tiny("qwen2")
    lean = copy.deepcopy(model)
    apply_lean_layers(lean)
    x = torch.randn(1, 30, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        norm = _saved_bytes(model.model.norm, x) - _saved_bytes(lean.model.norm, x)
        mlp = _saved_bytes(model.model.layers[0].mlp, x) - _saved_bytes(lean.model.layers[0].mlp, x)
    assert norm == 30 * 48 * 4  # the normalised value, fp32 (the input is the caller's, not counted)
    # fp32: silu(gate) and the down projection's input; under autocast silu(gate) in bf16 (the projection
    # stays a module there: autocast's cached weight cast is out of a custom backward's reach)
    assert mlp == (30 * 80 * 2 if autocast else 2 * 30 * 80 * 4)


@pytest.mark.parametrize("bias, frozen", [(False, False), (True, False), (False, True)])
def test_swiglu_down_backward_is_exact_in_float64(bias, frozen):
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(2, 9, 40, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(24, 40, generator=g, dtype=torch.float64, requires_grad=not frozen)
    b = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    grad_out = torch.randn(2, 9, 24, generator=g, dtype=torch.float64)
    inputs = [t for t in (gate, up, weight, b) if t is not None and t.requires_grad]
    ref = F.linear(F.silu(gate) * up, weight, b)
    out = SwiGLUDownFunction.apply(gate, up, weight, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_down_projection_folds_only_where_its_backward_can_be_exact():
    from erpo_fast.config import ModelConfig
    from erpo_fast.lora import add_adapters

    model = tiny("qwen2")
    assert folds_down_projection(model.model.layers[0].mlp.down_proj, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not folds_down_projection(model.model.layers[0].mlp.down_proj, "cpu")
    add_adapters(model, ModelConfig(lora_rank=4, lora_targets="down_proj"))
    assert not folds_down_projection(model.model.layers[0].mlp.down_proj, "cpu")  # peft's adapted linear


def test_other_models_are_left_alone():
    gelu = tiny("llama", hidden_act="gelu")
    assert not has_lean_layers(gelu.config) and apply_lean_layers(gelu) == 0
    assert "forward" not in vars(gelu.model.norm)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=50))
    assert apply_lean_layers(gpt2) == 0


def _backward_nodes(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return names


def test_a_model_loaded_from_a_folder_keeps_its_lean_layers(tmp_path):
    """The user's path: load_model (from_pretrained) -> Learner, then train/eval switches (evaluation). transformers
    5.x kernelizes a from_pretrained model whenever ``train()``/``eval()`` changes its mode, which puts the class
    forward back on hub-decorated layers (the RMSNorms) unless the load turned hub kernels off."""
    from conftest import save_tiny_model

    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.learner import Learner
    from erpo_fast.models import load_model

    model, _ = load_model(save_tiny_model(tmp_path / "model"), dtype="float32", device="cpu")
    learner = Learner(model, AlgorithmConfig(), TrainerConfig(), ModelConfig(), device="cpu", max_len=16)
    layers = learner.model.config.num_hidden_layers
    for mode in (True, False, True):
        learner.model.train(mode)
        hidden = learner.model.model(input_ids=torch.tensor([[3, 4, 5, 6]])).last_hidden_state
        nodes = _backward_nodes(hidden)
        assert nodes.count("RMSNormFunctionBackward") == 2 * layers + 1, mode
        assert "PowBackward0" not in nodes


def test_lean_layers_survive_kernelizing_on_a_model_loaded_with_transformers_defaults(tmp_path):
    """A model handed to apply_lean_layers straight from from_pretrained (kernelizing on, as a Python-API user's
    would be): train/eval switches must keep the lean norms."""
    from conftest import save_tiny_model

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "model"), local_files_only=True)
    apply_lean_layers(model)
    for mode in (True, False, True):
        model.train(mode)
        nodes = _backward_nodes(model.model(input_ids=torch.tensor([[3, 4, 5, 6]])).last_hidden_state)
        assert nodes.count("RMSNormFunctionBackward") == 2 * model.config.num_hidden_layers + 1, mode
