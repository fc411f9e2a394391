"""VLLMEngine weight sync on an untied-embedding Llama (tests/test_vllm_engine.py covers tied Qwen2).

A module of its own because vLLM keeps process-wide state: one engine at a time, and pytest finishes one
module's fixtures before the next module starts.
"""

from __future__ import annotations

import pytest
import torch
from test_vllm_engine import DEVICE, SYNC_ATOL, _check_update, _engine, _probe, _random_model, _save

from erpo_fast.engines.base import verify_sync
from erpo_fast.engines.vllm_engine import teacher_forced_logprobs


@pytest.mark.vllm
def test_update_weights_untied_llama_is_visible_and_verified(tmp_path):
    base = _random_model("llama", seed=0)
    engine = _engine(_save(base, tmp_path / "llama"))
    try:
        base = base.to(DEVICE)
        target = _random_model("llama", seed=2).to(DEVICE)
        assert not torch.equal(target.lm_head.weight, target.model.embed_tokens.weight)
        _check_update(engine, base, target, _probe(7))
        # The learner's compile/FSDP wrapper prefixes do not change the names vLLM receives.
        engine.update_weights((f"_orig_mod.{k}", v) for k, v in base.named_parameters())
        verify_sync(engine.prompt_logprobs(_probe(7)), teacher_forced_logprobs(base, _probe(7)), atol=SYNC_ATOL)
    finally:
        engine.close()
