"""The CPU decode's matmuls through oneDNN, on weights reordered into oneDNN's blocked layout once per generate.

Why: on CPU, ``F.linear`` sends an fp32 matmul to MKL's sgemm, which on the AMD EPYC of bench/NOTES.md runs at
60-90 GFLOP/s for decode's few rows (MKL takes no AVX-512 path on non-Intel CPUs), while oneDNN's brgemm kernel
over a reordered weight runs the same product at 95-110 (fp32) and 1.5-2.5x F.linear's rate in bf16 at 1-64 rows
(``python -m bench.bench_onednn_weights``). The reorder costs one pass over the weight, so the engine packs at the
start of a ``generate`` call and drops the packed copies when it returns: they can never go stale (the learner
updates the weights between calls), and they never outlive the rollout phase (one more copy of the linear
weights while sampling, counted by the memory plan).

The op is torch's own (``torch.ops.mkldnn._linear_pointwise``, which inductor's CPU freezing path calls on weights
``torch.ops.mkldnn._reorder_linear_weight`` packed). The plain-torch reference is ``F.linear`` (``reference_linear``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's CPU matmul runs natively here (fp16 needs AVX512-FP16)

reference_linear = F.linear


@functools.cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and runs ``dtype`` linears through oneDNN (probed once, on a tiny product)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        weight = torch.arange(24, dtype=torch.float32).reshape(4, 6).div_(7).to(dtype)
        x = torch.linspace(-1, 1, 18).reshape(3, 6).to(dtype)
        got = packed_linear(x, pack(weight), None)
    except RuntimeError:  # a build or CPU without the kernel
        return False
    return torch.allclose(got.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` weight reordered for :func:`packed_linear` (a new tensor; the weight is not touched)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``packed = pack(weight)``; x ``[..., in]`` in the weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """Through the packed copy when there is one, else the reference."""
    if packed is None:
        return reference_linear(x, weight, bias)
    return packed_linear(x, packed, bias)
