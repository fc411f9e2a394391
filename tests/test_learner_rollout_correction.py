"""Rollout/learner mismatch metrics, masked IS and CISPO through the Learner, with the NativeEngine as the rollout.

The engine and the learner hold the same fp32 weights of a tiny random Qwen2 built from a config, so their
log-probs of the sampled tokens agree to rounding: the mismatch metrics must be ~0. A perturbation planted in the
rollout log-probs must show up with its exact size. The loss with masked IS / CISPO is checked against a float64
reference: Hugging Face forwards of each sequence alone, hand-written IcePop weights, `algorithms.policy_loss`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from erpo_fast import algorithms
from erpo_fast.batch import RolloutSequence
from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
from erpo_fast.engines import NativeEngine
from erpo_fast.learner import Learner

VOCAB = 96
MAX_NEW = 6
TEMPERATURES = [0.5, 1.0, 1.6]  # one per prompt: ERPO's per-row temperatures
FP32 = ModelConfig(dtype="float32")


def tiny_qwen2(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def rollout_sequences(model, seed=0):
    """Sample 3 prompts x 3 responses with the NativeEngine at per-prompt temperatures; keep its log-probs."""
    engine = NativeEngine(copy.deepcopy(model))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 7, 2)]
    groups = engine.generate(prompts, TEMPERATURES, 3, MAX_NEW, seed=seed)
    seqs = []
    for i, (prompt, group) in enumerate(zip(prompts, groups)):
        for j, sample in enumerate(group):
            seqs.append(RolloutSequence(prompt_ids=prompt, response_ids=sample.token_ids,
                                        rollout_logprobs=list(sample.logprobs), temperature=TEMPERATURES[i],
                                        advantage=float(torch.randn(1, generator=g)), seq_key=10 * i + j))
    return seqs


def make_learner(model, algo=None, trainer=None):
    return Learner(model, algo or AlgorithmConfig(), trainer or TrainerConfig(lr=1e-3, micro_batch_size=4), FP32,
                   device="cpu", max_len=MAX_NEW)


def plant(seqs, every=3, shift=-1.0):
    """Shift every `every`-th rollout log-prob (counted over the whole batch) by `shift`; returns the count."""
    k = 0
    planted = 0
    for s in seqs:
        lps = list(s.rollout_logprobs)
        for j in range(len(lps)):
            if k % every == 0:
                lps[j] += shift
                planted += 1
            k += 1
        s.rollout_logprobs = lps
    return planted


MISMATCH_KEYS = ("mismatch_logp_abs_mean", "mismatch_logp_abs_max", "mismatch_kl_k3", "mismatch_ratio_outside_frac")


@pytest.mark.parametrize("algo, trainer", [
    (AlgorithmConfig(), TrainerConfig(lr=1e-3, micro_batch_size=4)),
    # off-policy mini-batches: the metrics come from the pre-update (old) log-probs, not from drifted ones
    (AlgorithmConfig(), TrainerConfig(lr=1e-2, micro_batch_size=2, updates_per_step=3)),
    # the loss at T=1 with truncated IS: the metrics must still compare both sides at the row's temperature
    (AlgorithmConfig(logprob_temperature="one", is_level="token"), TrainerConfig(lr=1e-3, micro_batch_size=4)),
    (AlgorithmConfig(loss_type="cispo", is_level="token", is_mask="sequence"), TrainerConfig(micro_batch_size=5)),
], ids=["default", "updates3", "logprob_T1", "cispo_masked"])
def test_mismatch_is_zero_when_engine_and_learner_agree(algo, trainer):
    model = tiny_qwen2()
    seqs = rollout_sequences(model)
    n_tokens = sum(len(s.response_ids) for s in seqs)
    assert n_tokens > 20
    metrics = make_learner(model, algo, trainer).train_on(seqs)
    assert metrics["mismatch_logp_abs_max"] < 2e-5, metrics
    assert metrics["mismatch_logp_abs_mean"] < 5e-6
    assert metrics["mismatch_kl_k3"] < 1e-9
    assert metrics["mismatch_ratio_outside_frac"] == 0.0
    if algo.is_mask != "none":
        assert metrics["is_mask_frac"] == 0.0 and metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("algo, trainer", [
    (AlgorithmConfig(), TrainerConfig(lr=1e-3, micro_batch_size=4)),
    (AlgorithmConfig(), TrainerConfig(lr=1e-2, micro_batch_size=2, updates_per_step=3)),
    (AlgorithmConfig(logprob_temperature="one", is_level="token"), TrainerConfig(lr=1e-3, micro_batch_size=4)),
], ids=["default", "updates3", "logprob_T1"])
def test_planted_perturbation_is_measured_exactly(algo, trainer):
    model = tiny_qwen2()
    seqs = rollout_sequences(model)
    n_tokens = sum(len(s.response_ids) for s in seqs)
    planted = plant(seqs, every=3, shift=-1.0)  # the engine under-reports a third of the tokens by 1 nat
    frac = planted / n_tokens
    metrics = make_learner(model, algo, trainer).train_on(seqs)
    assert metrics["mismatch_logp_abs_mean"] == pytest.approx(frac, abs=2e-5)
    assert metrics["mismatch_logp_abs_max"] == pytest.approx(1.0, abs=2e-5)
    assert metrics["mismatch_kl_k3"] == pytest.approx(frac * (math.e - 2.0), abs=1e-4)
    assert metrics["mismatch_ratio_outside_frac"] == pytest.approx(frac)  # ratio e > c = 2


@pytest.mark.slow
def test_train_run_logs_near_zero_mismatch(tmp_path, tmp_path_factory, monkeypatch):
    """End to end (`python -m erpo_fast.train`, native engine, fp32, rows sampled at T = 0.7): every step's
    metrics.jsonl record holds the mismatch metrics, and they are ~0."""
    from erpo_fast.logger import read_metrics
    from erpo_fast.train import main

    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    args = ["--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2",
            "--builtin.kv_heads", "1", "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "20",
            "--builtin.task", "arithmetic",  # easy: a barely trained model scores
            "--builtin.warm_start_problems", "2000",
            "--builtin.warm_start_batch_size", "16", "--builtin.num_train", "16", "--builtin.num_heldout", "8",
            "--trainer.prompts_per_step", "4", "--rollout.n", "4", "--rollout.max_new_tokens", "6",
            "--trainer.eval_every", "0", "--data.reward_workers", "0", "--logging.progress", "false",
            "--logging.plots", "false", "--trainer.threads", "1", "--trainer.lr", "1e-3",
            "--rollout.sync_check_every", "0", "--trainer.save_every", "0", "--algorithm.base_temperature", "0.7",
            "--algorithm.is_mask", "token", "--output-dir", str(tmp_path / "run"), "--max-steps", "4",
            # every sequence runs: this barely trained model's groups are all uniform (nothing would be measured)
            "--trainer.skip_zero_advantage", "false"]
    assert main(args) == 0
    records = read_metrics(tmp_path / "run")
    assert len(records) == 4
    for r in records:
        assert r["mismatch_logp_abs_max"] < 1e-4, r
        assert r["mismatch_kl_k3"] < 1e-8 and r["mismatch_ratio_outside_frac"] == 0.0
        assert r["is_mask_frac"] == 0.0
    assert records[0]["temperature_mean"] == pytest.approx(0.7)  # new prompts: sampled and scored at T = 0.7


def reference_logprobs64(model64, seqs):
    out = []
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model64(input_ids=ids).logits[0]
        p, r = len(s.prompt_ids), len(s.response_ids)
        logp = torch.log_softmax(logits[p - 1:p + r - 1] / s.temperature, dim=-1)
        out.append(logp.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("mask_level", ["token", "sequence"])
def test_masked_is_and_cispo_loss_and_grads_match_float64_reference(loss_type, mask_level):
    model = tiny_qwen2()
    model64 = copy.deepcopy(model).double()
    seqs = rollout_sequences(model, seed=3)
    g = torch.Generator().manual_seed(5)
    for i, s in enumerate(seqs):  # an engine that disagrees: noise per token, and two thirds of the sequences off by
        # +-0.6 nat on average (their geometric-mean ratio leaves the band)
        noise = 0.5 * torch.randn(len(s.rollout_logprobs), generator=g) + 0.6 * (i % 3 - 1)
        s.rollout_logprobs = (torch.tensor(s.rollout_logprobs) + noise).tolist()
    algo = AlgorithmConfig(loss_type=loss_type, is_level="token", is_clip=1.8, is_mask=mask_level, is_mask_low=0.7,
                           is_mask_high=1.4, cispo_eps_low=0.2, cispo_eps_high=0.5)
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=4))
    # Off-policy old log-probs (so CISPO's weight is clipped on both sides); the IS learner side is then `old`.
    lp_ref = reference_logprobs64(model64, seqs)
    old = lp_ref.detach() + 0.4 * torch.randn(lp_ref.shape, generator=g, dtype=torch.float64)
    lengths = [len(s.response_ids) for s in seqs]
    metrics = learner.loss_and_grads(seqs, old_logprobs=[o.float() for o in old.split(lengths)])

    # Reference, written out: band test on exp(old - rollout) per token or its per-sequence geometric mean,
    # then min(ratio, C) inside the band and 0 outside.
    rollout = torch.tensor([x for s in seqs for x in s.rollout_logprobs], dtype=torch.float64)
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    log_ratio = old - rollout
    if mask_level == "sequence":
        band_lr = torch.stack([log_ratio[seq_ids == i].mean() for i in range(len(seqs))])[seq_ids]
    else:
        band_lr = log_ratio
    inside = (band_lr >= math.log(0.7)) & (band_lr <= math.log(1.4))
    is_w = torch.where(inside, torch.exp(log_ratio).clamp(max=1.8), torch.zeros_like(log_ratio))
    assert 0 < int((~inside).sum()) < len(inside)  # the mask really rejects some tokens, not all
    adv = torch.cat([torch.full((n,), s.advantage, dtype=torch.float64) for n, s in zip(lengths, seqs)])
    lp = reference_logprobs64(model64, seqs)
    loss, ref_metrics = algorithms.policy_loss(
        lp, old, adv, torch.ones_like(lp, dtype=torch.bool), loss_agg=algo.loss_agg, seq_ids=seq_ids,
        eps_low=algo.eps_low, eps_high=algo.eps_high, is_weights=is_w, loss_type=loss_type,
        cispo_eps_low=algo.cispo_eps_low, cispo_eps_high=algo.cispo_eps_high)
    model64.zero_grad(set_to_none=True)
    loss.backward()
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["is_weight_mean"] == pytest.approx(is_w.mean().item(), rel=1e-5)
    assert metrics["is_mask_frac"] == pytest.approx((~inside).double().mean().item())
    assert metrics["clip_frac"] == pytest.approx(ref_metrics["clip_frac"])
    if loss_type == "cispo":
        assert ref_metrics["clip_frac_low"] > 0 and ref_metrics["clip_frac_high"] > 0
    ref_grads = dict(model64.named_parameters())
    for name, p in learner.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_grads[name].grad, rtol=1e-4, atol=2e-6, msg=name)


def test_is_mask_needs_rollout_logprobs():
    model = tiny_qwen2()
    seqs = rollout_sequences(model)
    seqs[1].rollout_logprobs = []
    with pytest.raises(ValueError, match="algorithm.is_mask=token needs rollout_logprobs"):
        make_learner(model, AlgorithmConfig(is_mask="token")).train_on(seqs)
