"""Rollout engines: prompts in, n sampled responses per prompt (each prompt at its own temperature) out.

- ``NativeEngine``: embedded, plain torch + ``erpo_fast.kernels.sampling.sample_tokens``; CPU and GPU.
- ``VLLMEngine``: colocated vLLM with sleep mode (GPU); needs ``pip install 'erpo-fast[vllm]'``. vLLM is
  imported only when a VLLMEngine is built, so this package imports without it.

See ``base.py`` for the contract every engine follows.
"""

from __future__ import annotations

from erpo_fast.choices import ENGINES

from .base import RolloutEngine, Sample, validate_generate_args
from .native import NativeEngine
from .vllm_engine import VLLMEngine, vllm_available


def make_engine(kind: str, model, **kwargs) -> RolloutEngine:
    """Build a rollout engine by name.

    ``make_engine("native", hf_model, device=..., dtype=...)`` or
    ``make_engine("vllm", "/path/to/local/model_dir", gpu_memory_utilization=0.3, ...)``.
    """
    if kind == "native":
        return NativeEngine(model, **kwargs)
    if kind == "vllm":
        return VLLMEngine(model, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; choose one of {ENGINES}")


__all__ = ["NativeEngine", "RolloutEngine", "Sample", "VLLMEngine", "make_engine",
           "validate_generate_args", "vllm_available"]
