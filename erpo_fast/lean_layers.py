"""Memory-lean backward for the decoder's RMSNorms and SwiGLU MLPs (same forward, same gradients).

transformers' Llama-family layers are written as plain torch expressions, so autograd keeps every intermediate
the expression happens to name:

- an ``RMSNorm`` keeps its input AND the normalised value (``[T, H]`` fp32 each) besides the reciprocal RMS;
- an MLP's ``down_proj(act_fn(gate) * up)`` keeps the gate, ``silu(gate)``, ``up`` and their product, the down
  projection's input (``[T, I]`` each).

The autograd functions below keep only what their backward cannot cheaply recompute: the norm's input and its
``[T, 1]`` reciprocal RMS (the normalised value is one multiply away), and the MLP's gate and up projections
(``silu(gate)`` and the product are recomputed; the down projection's weight gradient takes the recomputed
product). That is one ``[T, H]`` per norm and two ``[T, I]`` per MLP less per layer: a learner micro-batch saved
0.65x (SmolLM2-135M's shape) and 0.59x (Qwen2.5-0.5B's) the bytes in fp32 (bench/NOTES.md;
``erpo_fast.memory_plan`` counts them). Under autocast
the down projection stays a module (autocast's cast of its weight lives in a cache its backward cannot reach), so
there the MLP keeps the product: one ``[T, I]`` less. With LoRA on ``down_proj`` likewise. Liger's RMSNorm and
SwiGLU kernels keep what the autocast case keeps.

The forward is the very expression transformers runs (bit for bit); the activation's backward calls the ops
autograd would (bit for bit); the norm's backward is the closed form of autograd's chain, equal to it up to float
rounding, and the folded down projection's the same three products autograd takes (tests/test_lean_layers.py:
float64 references, transformers' own modules, and the saved bytes).

:func:`apply_lean_layers` swaps the ``forward`` of the modules it knows (llama, qwen2, qwen3 and mistral, whose
classes run the expressions above: the tests compare against them); any other module is left as it is, and the
memory plan counts it as transformers'.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LEAN_MODEL_TYPES", "RMSNormFunction", "SiluMulFunction", "SwiGLUDownFunction", "apply_lean_layers",
           "folds_down_projection", "has_lean_layers"]

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


class SwiGLUDownFunction(torch.autograd.Function):
    """``linear(silu(gate) * up, weight, bias)``, the MLP's activation and down projection in one; saves gate and
    up only: the projection's input ``silu(gate) * up`` is recomputed for its weight gradient."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up, weight = ctx.saved_tensors
        act = F.silu(gate)
        grad_weight = grad_bias = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_weight = flat_grad.t().mm((act * up).reshape(-1, up.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat_grad.sum(0)
        grad_product = grad_out.matmul(weight)
        grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_product * act if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, grad_weight, grad_bias


def _lean_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def folds_down_projection(down_proj: nn.Module, device_type: str) -> bool:
    """Whether the MLP's down projection joins its activation (:class:`SwiGLUDownFunction`): a plain linear (not
    a LoRA-adapted one), outside autocast (whose cast of the weight lives in autocast's cache, which a backward
    cannot reach; there the projection stays a module and only the activation is lean)."""
    return type(down_proj) is nn.Linear and not torch.is_autocast_enabled(device_type)


def _lean_mlp_forward(self, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if folds_down_projection(self.down_proj, gate.device.type):
        return SwiGLUDownFunction.apply(gate, up, self.down_proj.weight, self.down_proj.bias)
    return self.down_proj(SiluMulFunction.apply(gate, up))


def has_lean_layers(config) -> bool:
    """Whether :func:`apply_lean_layers` swaps a model of this config (what the memory plan counts)."""
    return getattr(config, "model_type", None) in LEAN_MODEL_TYPES and getattr(config, "hidden_act", None) in _SILU


def apply_lean_layers(model: nn.Module) -> int:
    """Give ``model``'s RMSNorms and SwiGLU MLPs the lean backward; returns how many modules were swapped (0 for
    a model type not in ``LEAN_MODEL_TYPES``). Modules already replaced by other classes (Liger) are not touched."""
    config = getattr(model, "config", None)
    if not has_lean_layers(config):
        return 0
    if getattr(model, "use_kernels", False):
        # transformers' Hub kernelizing (on by default for from_pretrained with `kernels` installed) re-kernelizes at
        # every train()/eval() switch, putting its own RMSNorm forward back over ours: turn it off (reverts first).
        model.use_kernels = False
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
