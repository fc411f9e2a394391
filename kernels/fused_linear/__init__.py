"""Fused linear log-prob and GRPO-loss ops with a per-row temperature, straight from hidden states.

``linear_logprobs`` and ``linear_grpo_loss`` (ops.py: dispatch and autograd glue) never hold the ``[N, V]``
logits. Backends: naive.py (reference), chunked.py (torch, the CPU default), triton_kernels.py (the CUDA default).
"""

from .naive import IGNORE_INDEX
from .ops import BACKENDS, linear_grpo_loss, linear_logprobs

__all__ = ["BACKENDS", "IGNORE_INDEX", "linear_grpo_loss", "linear_logprobs"]
