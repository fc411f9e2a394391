"""One copy of the weights: a native engine in the learner's dtype on its device reads the learner's parameters.

Checked through the real session: the engine's weights are the learner's memory, an update is seen without a
copy, the engine samples exactly what a separately synced copy samples, and the sync check still catches an
engine that does not see the update.
"""

from __future__ import annotations

import json

import pytest
import torch

from erpo_fast.config import BuiltinConfig, build_config
from erpo_fast.distributed import init_runtime
from erpo_fast.errors import WeightSyncError
from erpo_fast.models import build_tiny_qwen2
from erpo_fast.session import build_session
from erpo_fast.tokenizer import build_char_tokenizer
from erpo_fast.train import train_step

TINY = BuiltinConfig(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, TINY, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with (root / "data.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n")
    return root


def session_for(assets, tmp_path, share):
    cfg = build_config("none", overrides={
        "model.path": str(assets / "model"), "data.path": str(assets / "data.jsonl"), "data.reward": "arithmetic",
        "data.reward_workers": 0, "data.chat_template": False, "rollout.n": 4, "rollout.max_new_tokens": 6,
        "rollout.share_weights": share, "rollout.sync_check_every": 1, "trainer.prompts_per_step": 2,
        "trainer.lr": 5e-2, "trainer.device": "cpu", "trainer.eval_every": 0, "trainer.save_every": 0,
        "trainer.output_dir": str(tmp_path / f"run-{share}"), "logging.progress": False, "logging.plots": False})
    return build_session(cfg, init_runtime("cpu"))


def _probe(session):
    return session.rollout.engine.generate([[5, 6, 7]], [1.0], 4, 6, stop_token_ids=[], seed=11)


def test_engine_reads_the_learners_parameters_and_samples_like_a_synced_copy(assets, tmp_path):
    shared, copied = session_for(assets, tmp_path, True), session_for(assets, tmp_path, False)
    try:
        engine, learner = shared.rollout.engine, shared.learner
        assert engine.model is learner.model
        learner_ptrs = {p.data_ptr() for p in learner.model.parameters()}
        assert {p.data_ptr() for p in engine.model.parameters()} == learner_ptrs
        assert copied.rollout.engine.model is not copied.learner.model
        assert not {p.data_ptr() for p in copied.rollout.engine.model.parameters()} & {
            p.data_ptr() for p in copied.learner.model.parameters()}
        before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
        for step in (1, 2):  # each step: rollout, learn, sync (a no-op when shared), sync check every step
            m_shared, m_copied = train_step(shared, step, None), train_step(copied, step, None)
            assert m_shared["loss"] == pytest.approx(m_copied["loss"], rel=1e-4, abs=1e-6)
        assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters())  # it learnt
        assert {p.data_ptr() for p in learner.model.parameters()} == learner_ptrs  # still one copy
        a, b = _probe(shared), _probe(copied)
        assert [s.token_ids for s in a[0]] == [s.token_ids for s in b[0]]
        torch.testing.assert_close(torch.tensor([s.logprobs for s in a[0]]),
                                   torch.tensor([s.logprobs for s in b[0]]), rtol=1e-4, atol=1e-4)
        assert engine.update_weights(learner.named_weights()) == len(list(learner.model.parameters()))
    finally:
        shared.close()
        copied.close()


def test_sync_check_still_catches_an_engine_that_misses_the_update(assets, tmp_path):
    session = session_for(assets, tmp_path, True)
    try:
        train_step(session, 1, None)  # a healthy shared engine passes the check
        # Break the sharing the way a bug would: the engine's fused q/k/v buffers stop being the parameters'
        # memory (a stale private copy), while the aliasing bookkeeping still claims they are.
        for layer in session.rollout.engine.runner.layers:
            layer.w_qkv = layer.w_qkv.clone()
        with pytest.raises(WeightSyncError, match="not sampling from the synced weights"):
            train_step(session, 2, None)
    finally:
        session.close()


def test_the_sync_probe_is_the_first_32_training_prompts_each_with_a_seed_of_its_own(assets, tmp_path):
    """The probe samples every training prompt up to 32 (here all 8), max_new_tokens (up to 16) tokens each, no
    stop; a prompt's sample does not depend on the others in the probe; a synced engine passes the check on it."""
    from erpo_fast.rollout import SYNC_PROBE_PROMPTS, check_probe

    session = session_for(assets, tmp_path, False)
    try:
        rollout = session.rollout
        probe = rollout.sample_probe(5)
        assert SYNC_PROBE_PROMPTS == 32 and len(probe) == len(rollout.train) == 8
        assert [seq.prompt_ids for seq in probe] == [list(p) for p in rollout.prompt_ids]
        assert all(len(seq.response_ids) == len(seq.rollout_logprobs) == 6 for seq in probe)
        assert rollout.sample_probe(5, num_prompts=1)[0].response_ids == probe[0].response_ids
        assert rollout.sample_probe(6, num_prompts=1)[0].response_ids != probe[0].response_ids  # seeded by step
        assert check_probe(session.learner, probe, session.cfg, step=5)["tokens"] == 48
    finally:
        session.close()
