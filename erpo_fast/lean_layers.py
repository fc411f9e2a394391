"""Memory-lean backward for the decoder's RMSNorms and SwiGLU activations (same forward, same gradients).

transformers' Llama-family layers are written as plain torch expressions, so autograd keeps every intermediate
the expression happens to name:

- an ``RMSNorm`` keeps its input AND the normalised value (``[T, H]`` fp32 each) besides the reciprocal RMS;
- an MLP's ``act_fn(gate) * up`` keeps the gate, ``silu(gate)`` and ``up`` (``[T, I]`` each).

The two autograd functions below keep only what their backward cannot cheaply recompute: the norm's input and
its ``[T, 1]`` reciprocal RMS (the normalised value is one multiply away), and the MLP's gate and up projections
(``silu(gate)`` is recomputed). That is one ``[T, H]`` per norm and one ``[T, I]`` per MLP less per layer,
about a quarter of a layer's saved activations at SmolLM2-135M's and Qwen2.5-0.5B's shapes (see
``erpo_fast.memory_plan``, which counts them). Liger's RMSNorm and SwiGLU kernels keep the same tensors on CUDA.

The forward is the very expression transformers runs (bit for bit); the SwiGLU backward calls the ops autograd
would (bit for bit); the norm's backward is the closed form of autograd's chain, equal to it up to float rounding
(tests/test_lean_layers.py: float64 references, transformers' own modules, and the saved bytes).

:func:`apply_lean_layers` swaps the ``forward`` of the modules it knows (their source is checked against the
expression above by the tests); any other module is left as it is, and the memory plan counts it as transformers'.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LEAN_MODEL_TYPES", "RMSNormFunction", "SiluMulFunction", "apply_lean_layers", "has_lean_layers"]

# Model types whose RMSNorm and MLP classes are the Llama expressions (``<Name>RMSNorm``, ``<Name>MLP``).
LEAN_MODEL_TYPES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
_SILU = ("silu", "swish")


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))``, computed in fp32 (float64 for float64 input, where
    transformers would round to fp32) and cast back as transformers does; saves x and the reciprocal RMS only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(rstd.dtype)  # d loss / d xhat
            # d xhat / d x = rstd (I - xhat xhat^T / H): project out the part along xhat.
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes ``silu(gate)`` in the backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def has_lean_layers(config) -> bool:
    """Whether :func:`apply_lean_layers` swaps a model of this config (what the memory plan counts)."""
    return getattr(config, "model_type", None) in LEAN_MODEL_TYPES and getattr(config, "hidden_act", None) in _SILU


def apply_lean_layers(model: nn.Module) -> int:
    """Give ``model``'s RMSNorms and SwiGLU MLPs the lean backward; returns how many modules were swapped (0 for
    a model type not in ``LEAN_MODEL_TYPES``). Modules already replaced by other classes (Liger) are not touched."""
    config = getattr(model, "config", None)
    if not has_lean_layers(config):
        return 0
    prefix = LEAN_MODEL_TYPES[config.model_type]
    swapped = 0
    for module in model.modules():
        name = type(module).__name__
        if name == f"{prefix}RMSNorm":
            module.forward = types.MethodType(_lean_norm_forward, module)
        elif name == f"{prefix}MLP":
            module.forward = types.MethodType(_lean_mlp_forward, module)
        else:
            continue
        swapped += 1
    return swapped
