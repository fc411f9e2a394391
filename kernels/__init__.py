"""Fused per-row-temperature kernels, importable as ``erpo_fast.kernels``.

Every op keeps three backends side by side: a plain-torch ``reference`` (float64-capable), a chunked,
memory-bounded ``torch`` backend (the CPU default) and a ``triton`` kernel (the CUDA default, also run
under ``TRITON_INTERPRET=1`` in the CPU tests). Temperature is always a runtime per-row fp32 tensor.
"""

from .fused_linear import linear_grpo_loss, linear_logprobs
from .sampling import NonFiniteLogitsError, sample_tokens

__all__ = ["NonFiniteLogitsError", "linear_logprobs", "linear_grpo_loss", "sample_tokens"]
