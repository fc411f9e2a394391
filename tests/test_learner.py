"""The learner and model plumbing against independent references.

References: Hugging Face forwards of each sequence ALONE (no packing) to full logits, run in float64, then
log_softmax / gather and `erpo_fast.algorithms.policy_loss`; autograd through that gives the reference
gradient.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from erpo_fast import algorithms
from erpo_fast.batch import IGNORE_INDEX, RolloutSequence, pack_sequences
from erpo_fast.config import AlgorithmConfig, BuiltinConfig, ModelConfig, TrainerConfig
from erpo_fast.learner import Learner, lr_factor
from erpo_fast.models import (
    ModelLoadError,
    build_tiny_qwen2,
    last_hidden_state,
    lm_head_weight,
    load_model,
    resolve_attn_implementation,
    resolve_dtype,
)
from erpo_fast.tokenizer import build_char_tokenizer

TINY = BuiltinConfig(hidden_size=32, layers=2, heads=4, kv_heads=2,
                   intermediate_size=64)
MAX_LEN = 8




@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def tiny_model(tokenizer, seed=0, attn="sdpa"):
    return build_tiny_qwen2(tokenizer, TINY, seed, attn_implementation=attn)


def make_sequences(n, seed=0, vocab=58, max_prompt=6, max_response=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        r = int(torch.randint(1, max_response + 1, (1,), generator=g))
        out.append(RolloutSequence(
            prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
            rollout_logprobs=(-4.0 + 0.5 * torch.randn(r, generator=g)).tolist(),
            temperature=float(0.6 + 0.8 * torch.rand(1, generator=g)),
            advantage=float(torch.randn(1, generator=g)),
            seq_key=100 + i,
        ))
    return out


def reference_logprobs(model, sequences, temperature="row"):
    """Per-sequence log-probs of the response tokens: each sequence alone, full logits / T, log_softmax."""
    out = []
    for seq in sequences:
        ids = torch.tensor([seq.prompt_ids + seq.response_ids])
        logits = model(input_ids=ids).logits[0]
        p, r = len(seq.prompt_ids), len(seq.response_ids)
        t = seq.temperature if temperature == "row" else temperature
        logp = torch.log_softmax(logits[p - 1:p + r - 1] / t, dim=-1)
        out.append(logp.gather(1, torch.tensor(seq.response_ids)[:, None])[:, 0])
    return out


def reference_loss(model64, sequences, algo, *, old=None, ref_model64=None, rollout_is=True):
    """float64 full-logits loss (and its gradient in model64's .grad) with the learner's conventions."""
    temperature = "row" if algo.logprob_temperature == "row" else 1.0
    lp_list = reference_logprobs(model64, sequences, temperature)
    lp = torch.cat(lp_list)
    seq_ids = torch.cat([torch.full((len(s.response_ids),), i) for i, s in enumerate(sequences)])
    adv = torch.cat([torch.full((len(s.response_ids),), s.advantage, dtype=torch.float64) for s in sequences])
    mask = torch.ones_like(lp, dtype=torch.bool)
    ref = None
    if ref_model64 is not None:
        with torch.no_grad():
            ref = torch.cat(reference_logprobs(ref_model64, sequences, temperature))
    is_w = None
    if algo.is_level not in ("none", "auto") and rollout_is:  # auto: none outside an async run
        # Written out by hand (not algorithms.truncated_is_weights): min(exp(learner - rollout), C).
        rollout = torch.cat([torch.tensor(s.rollout_logprobs, dtype=torch.float64) for s in sequences])
        diff = lp.detach() - rollout
        if algo.is_level == "sequence":
            sums = torch.zeros(len(sequences), dtype=torch.float64).index_add_(0, seq_ids, diff)
            diff = sums[seq_ids]
        is_w = torch.exp(diff).clamp(max=algo.is_clip)
    old_t = lp.detach() if old is None else torch.cat(old).double()
    loss, metrics = algorithms.policy_loss(
        lp, old_t, adv, mask, ref_logprobs=ref, kl_beta=algo.kl_beta, kl_estimator=algo.kl_estimator,
        eps_low=algo.eps_low, eps_high=algo.eps_high, dual_clip=algo.dual_clip, loss_agg=algo.loss_agg, seq_ids=seq_ids,
        max_len=MAX_LEN, ratio_level=algo.ratio_level, is_weights=is_w)
    model64.zero_grad(set_to_none=True)
    loss.backward()
    return loss, metrics, is_w, ref, lp.detach()


def assert_grads_close(learner_model, model64, rtol=1e-4, atol=2e-6):
    ref = dict(model64.named_parameters())
    checked = 0
    for name, p in learner_model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), ref[name].grad, rtol=rtol, atol=atol, msg=name)
        checked += 1
    assert checked == len(ref)


# ----------------------------------------------------------------------------------------------------
# models.py
# ----------------------------------------------------------------------------------------------------

def test_build_tiny_qwen2_is_deterministic_and_tied(tokenizer):
    a, b, c = tiny_model(tokenizer, 3), tiny_model(tokenizer, 3), tiny_model(tokenizer, 4)
    assert a.config.vocab_size == len(tokenizer)
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 2
    assert a.config.pad_token_id == tokenizer.pad_token_id and a.config.eos_token_id == tokenizer.eos_token_id
    assert lm_head_weight(a) is a.get_input_embeddings().weight  # tied
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name


def test_build_tiny_qwen2_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_qwen2(tokenizer, BuiltinConfig(hidden_size=30, heads=4), 0)


def test_last_hidden_state_matches_hf_logits(tokenizer):
    model = tiny_model(tokenizer)
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    hidden = last_hidden_state(model, ids, torch.arange(5)[None])
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, rtol=0, atol=1e-5)


def test_load_model_round_trip_and_errors(tokenizer, tmp_path):
    model = tiny_model(tokenizer, 1)
    good = tmp_path / "good"
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    loaded, tok = load_model(good, device="cpu")
    assert loaded.dtype == torch.float32 and loaded.config._attn_implementation == "sdpa"
    assert tok.encode("12+3") == tokenizer.encode("12+3")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    no_tok = tmp_path / "no_tok"
    model.save_pretrained(no_tok)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(no_tok)
    assert issubclass(ModelLoadError, ValueError)


def _file_mappings(path) -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(path):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end))
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_load_model_owns_its_memory(tokenizer, tmp_path):
    """No loaded parameter may stay a view of the memory-mapped checkpoint (its pages would count twice)."""
    from transformers import AutoModelForCausalLM

    tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").resolve()

    def inside(model, mappings):
        return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in mappings)]

    # Control: transformers' own load does leave parameters inside the file mapping (so the check is live).
    raw = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert inside(raw, _file_mappings(weights))
    del raw
    model, _ = load_model(tmp_path, dtype="float32", device="cpu")
    assert not inside(model, _file_mappings(weights))


def test_resolve_defaults_on_cpu():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="attn_implementation"):
        resolve_attn_implementation("flash", "cpu")


# ----------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------

def test_pack_layout_labels_and_mask():
    seqs = [
        RolloutSequence([10, 11], [20, 21, 22], [-1.0, -2.0, -3.0], 0.5, 1.5, 7),
        RolloutSequence([12, 13, 14], [], [], 1.5, -1.0, 8),
        RolloutSequence([15], [23, 24], [-4.0, -5.0], 1.25, -0.5, 9),
    ]
    b = pack_sequences(seqs)
    x = IGNORE_INDEX
    assert b.input_ids.tolist() == [[10, 11, 20, 21, 22, 12, 13, 14, 15, 23, 24]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]]
    # Position t predicts token t+1: response tokens only; prompt targets and sequence ends are ignored.
    assert b.labels.tolist() == [x, 20, 21, 22, x, x, x, x, 23, 24, x]
    assert b.label_index.tolist() == [1, 2, 3, 8, 9]
    assert b.target_ids.tolist() == [20, 21, 22, 23, 24]
    assert b.row_seq.tolist() == [0] * 5 + [1] * 3 + [2] * 3
    assert b.seq_ids.tolist() == [0, 0, 0, 2, 2]
    assert b.temperature.tolist() == [0.5, 0.5, 0.5, 1.25, 1.25]
    assert b.advantages.tolist() == [1.5, 1.5, 1.5, -0.5, -0.5]
    assert b.rollout_logprobs.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert b.num_tokens == 5 and b.num_sequences == 2 and b.response_lengths == [3, 0, 2]
    assert pack_sequences(seqs, temperature=1.0).temperature.tolist() == [1.0] * 5


def test_pack_shared_prompts_layout():
    seqs = [
        RolloutSequence([10, 11], [20, 21, 22], [], 0.5, 1.5, 7),
        RolloutSequence([10, 11], [], [], 0.5, 1.5, 8),
        RolloutSequence([10, 11], [25, 26], [], 0.5, -1.0, 9),
        RolloutSequence([15], [23, 24], [], 1.25, -0.5, 10),
    ]
    b = pack_sequences(seqs, share_prompts=True)
    # Each prompt once; responses continue its positions; a response's first token is predicted from the
    # prompt's last position (row index 1 for the group, 8 for the last sequence).
    assert b.input_ids.tolist() == [[10, 11, 20, 21, 22, 25, 26, 15, 23, 24]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2]]
    assert b.label_index.tolist() == [1, 2, 3, 1, 5, 7, 8]
    assert b.target_ids.tolist() == [20, 21, 22, 25, 26, 23, 24]
    assert b.seq_ids.tolist() == [0, 0, 0, 2, 2, 3, 3]
    assert b.segments == [(0, 2, 2, 3), (0, 2, 5, 0), (0, 2, 5, 2), (7, 1, 8, 2)]
    def shares_prompts(batch):  # some prompt is stored once for several sequences
        return len({seg[0] for seg in batch.segments}) < len(batch.segments)
    assert shares_prompts(b) and not shares_prompts(pack_sequences(seqs))
    assert pack_sequences(seqs).input_ids.shape[1] == 14


def group_sequences(groups, n, seed=0, vocab=58):
    """GRPO-shaped batches: ``groups`` prompts, ``n`` samples each (one of them empty), in group order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(groups):
        prompt = torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        temperature = float(0.6 + 0.8 * torch.rand(1, generator=g))
        for j in range(n):
            r = 0 if (i, j) == (1, 2) else int(torch.randint(1, 7, (1,), generator=g))
            out.append(RolloutSequence(prompt, torch.randint(3, vocab, (r,), generator=g).tolist(),
                                       (-4.0 + 0.5 * torch.randn(r, generator=g)).tolist(), temperature,
                                       float(torch.randn(1, generator=g)), len(out)))
    return out


@pytest.mark.parametrize("micro", [5, 16])  # 5: groups of 4 straddle micro-batches
def test_shared_prompt_groups_match_full_logits_reference(tokenizer, micro):
    model = tiny_model(tokenizer)
    model64 = copy.deepcopy(model).double()
    algo = AlgorithmConfig()
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=micro))
    assert learner._packed  # sdpa model: packed attention, prompts shared inside each micro-batch
    seqs = group_sequences(4, 4, seed=11)
    metrics = learner.loss_and_grads(seqs)
    ref_loss, *_ = reference_loss(model64, seqs, algo)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert_grads_close(learner.model, model64)
    with torch.no_grad():
        expected = reference_logprobs(model64, seqs)
    for got, want in zip(learner.compute_logprobs(seqs), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_pack_and_sequence_validation():
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        RolloutSequence([], [1], [0.0], 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        RolloutSequence([1], [1, 2], [0.0], 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutSequence([1], [1], [0.0], 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        pack_sequences([RolloutSequence([1], [99], [], 1.0, 0.0, 0)], vocab_size=58)
    with pytest.raises(ValueError, match="temperature"):
        pack_sequences([RolloutSequence([1], [2], [], 1.0, 0.0, 0)], temperature="one")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_each_sequence_alone(tokenizer, attn):
    model = tiny_model(tokenizer, attn=attn)
    seqs = make_sequences(4, seed=1)
    b = pack_sequences(seqs)
    with torch.no_grad():
        packed = last_hidden_state(model, b.input_ids, b.position_ids)[0]
        alone = torch.cat([last_hidden_state(model, torch.tensor([s.prompt_ids + s.response_ids]),
                                             torch.arange(len(s.prompt_ids) + len(s.response_ids))[None])[0]
                           for s in seqs])
        # Control: without restarting positions the sequences attend to each other, and the states differ.
        crossed = last_hidden_state(model, b.input_ids, torch.arange(b.input_ids.shape[1])[None])[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (crossed - alone).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# loss, gradients and log-probs against the full-logits reference
# ----------------------------------------------------------------------------------------------------

def make_learner(model, algo=None, trainer=None, model_cfg=None, ref_model=None):
    return Learner(model, algo or AlgorithmConfig(), trainer or TrainerConfig(), model_cfg or ModelConfig(),
                   device="cpu", max_len=MAX_LEN, ref_model=ref_model)


@pytest.mark.parametrize("loss_agg, ratio_level, logprob_temperature", [
    ("token_mean", "token", "row"),
    ("seq_mean_token_mean", "sequence", "row"),
    ("seq_mean_token_sum_norm", "token", "one"),
])
def test_loss_and_grads_match_full_logits_reference(tokenizer, loss_agg, ratio_level, logprob_temperature):
    model = tiny_model(tokenizer)
    model64 = copy.deepcopy(model).double()
    algo = AlgorithmConfig(loss_agg=loss_agg, ratio_level=ratio_level,
                           logprob_temperature=logprob_temperature)
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=3))
    seqs = make_sequences(7, seed=2)
    metrics = learner.loss_and_grads(seqs)
    ref_loss, ref_metrics, *_ = reference_loss(model64, seqs, algo)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["num_tokens"] == sum(len(s.response_ids) for s in seqs)
    assert metrics["clip_frac"] == 0.0  # on-policy: ratio 1 everywhere
    assert_grads_close(learner.model, model64)


def _off_policy_loss(tokenizer, algo, noise):
    """loss_and_grads of 6 sequences (micro-batches of 4, 6 and 8 tokens) with old log-probs = the current ones +
    ``noise`` x N(0, 1); returns (metrics, float64 reference loss, its metrics, learner, float64 model)."""
    model = tiny_model(tokenizer)
    model64 = copy.deepcopy(model).double()
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=2))
    seqs = make_sequences(6, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        current = reference_logprobs(model64, seqs)
    old = [(c + noise * torch.randn(c.shape, generator=g, dtype=torch.float64)).float() for c in current]
    metrics = learner.loss_and_grads(seqs, old_logprobs=old)
    ref_loss, ref_metrics, *_ = reference_loss(model64, seqs, algo, old=old)
    return metrics, ref_loss, ref_metrics, learner, model64


def test_off_policy_old_logprobs_match_reference(tokenizer):
    algo = AlgorithmConfig(eps_low=0.1, eps_high=0.1, dual_clip=3.0)
    metrics, ref_loss, ref_metrics, learner, model64 = _off_policy_loss(tokenizer, algo, noise=0.3)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert metrics["clip_frac"] == pytest.approx(ref_metrics["clip_frac"], abs=1e-6)
    assert metrics["clip_frac"] > 0
    assert_grads_close(learner.model, model64)


def test_every_policy_loss_metric_is_the_mini_batch_token_mean(tokenizer):
    # Three micro-batches of unequal size: a mean of micro-batch means would differ from policy_loss's value.
    algo = AlgorithmConfig(eps_low=0.1, eps_high=0.1, dual_clip=1.5)
    metrics, _, ref_metrics, *_ = _off_policy_loss(tokenizer, algo, noise=1.0)
    for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "dual_clip_frac"):
        assert ref_metrics[key] > 0, key  # every one is exercised
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_accumulation_equals_full_batch(tokenizer, loss_agg):
    seqs = make_sequences(8, seed=4)
    grads, losses = [], []
    for micro in (2, 8):
        learner = make_learner(tiny_model(tokenizer), AlgorithmConfig(loss_agg=loss_agg),
                               TrainerConfig(micro_batch_size=micro))
        losses.append(learner.loss_and_grads(seqs)["loss"])
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-8)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_token_budget_micro_batches_give_the_full_batch_gradient(tokenizer, loss_agg):
    seqs = make_sequences(8, seed=6)
    seqs[4:8] = [RolloutSequence(seqs[3].prompt_ids, s.response_ids, s.rollout_logprobs, s.temperature, s.advantage,
                                 s.seq_key) for s in seqs[4:8]]  # a group sharing a prompt, split by the budget
    grads, losses, counts = [], [], []
    for tokens in (0, 9, 14):
        learner = make_learner(tiny_model(tokenizer), AlgorithmConfig(loss_agg=loss_agg),
                               TrainerConfig(micro_batch_size=8, micro_batch_tokens=tokens))
        counts.append(len(learner._micro_batches(seqs)))
        losses.append(learner.loss_and_grads(seqs)["loss"])
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters()})
    assert counts[0] == 1 and counts[1] > counts[2] > 1  # the budgets really split the batch
    for k in (1, 2):
        assert losses[k] == pytest.approx(losses[0], rel=1e-6, abs=1e-8)
        for name in grads[0]:
            torch.testing.assert_close(grads[k][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_agg, updates", [("token_mean", 1), ("seq_mean_token_mean", 2)])
def test_zero_advantage_sequences_are_left_out_and_the_gradient_is_the_full_batch_one(tokenizer, monkeypatch,
                                                                                        loss_agg, updates):
    from erpo_fast.kernels import fused_linear

    seqs = make_sequences(8, seed=4)
    for s in seqs[2:5]:  # a uniform group: advantage exactly 0
        s.advantage = 0.0
    scored = []  # the response tokens of every loss call

    def spy(hidden, weight, labels, *args, **kw):
        scored.extend(labels.tolist())
        return loss(hidden, weight, labels, *args, **kw)

    loss = fused_linear.linear_grpo_loss
    monkeypatch.setattr(fused_linear, "linear_grpo_loss", spy)
    model = tiny_model(tokenizer)
    model64 = copy.deepcopy(model).double()
    algo = AlgorithmConfig(loss_agg=loss_agg)
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=2))
    metrics = learner.loss_and_grads(seqs)
    ref_loss, *_ = reference_loss(model64, seqs, algo)  # every sequence, the zero-advantage ones too
    assert scored == [t for s in seqs if s.advantage != 0.0 for t in s.response_ids]
    assert metrics["zero_adv_skipped"] == 3
    assert metrics["num_tokens"] == sum(len(s.response_ids) for s in seqs) and metrics["num_sequences"] == 8
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert_grads_close(learner.model, model64)
    # A whole step (updates_per_step mini-batches, the old log-probs' pre-pass) moves the weights as the learner that
    # runs every sequence does; Adam turns rounding-level gradient differences into lr-sized ones where a gradient
    # is near zero, hence the tolerance.
    scored.clear()
    trainer = TrainerConfig(micro_batch_size=2, updates_per_step=updates, lr=1e-3)
    every = make_learner(tiny_model(tokenizer), algo, dataclasses.replace(trainer, skip_zero_advantage=False))
    skipping = make_learner(tiny_model(tokenizer), algo, trainer)
    assert every.train_on(seqs)["zero_adv_skipped"] == 0
    assert len(scored) == sum(len(s.response_ids) for s in seqs)
    scored.clear()
    assert skipping.train_on(seqs)["zero_adv_skipped"] == 3
    assert len(scored) == sum(len(s.response_ids) for s in seqs if s.advantage != 0.0)
    for (name, a), b in zip(every.model.named_parameters(), skipping.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5, msg=name)


def test_a_step_whose_sequences_all_have_zero_advantage_still_takes_adamws_step(tokenizer):
    """Momentum and weight decay move the weights on a zero gradient; leaving every sequence out must not skip
    that step (AdamW skips a parameter whose .grad is None)."""
    signal, uniform = make_sequences(4, seed=12), make_sequences(4, seed=13)
    for s in uniform:
        s.advantage = 0.0
    models, results = [], []
    for skip in (False, True):
        trainer = TrainerConfig(lr=1e-2, weight_decay=0.1, skip_zero_advantage=skip)
        learner = make_learner(tiny_model(tokenizer), trainer=trainer)
        learner.train_on(signal)  # no zero advantage: the same passes either way
        before = [p.detach().clone() for p in learner.model.parameters()]
        results.append(learner.train_on(uniform))
        assert all(not torch.equal(a, p) for a, p in zip(before, learner.model.parameters()))
        models.append(learner.model)
    assert results[1]["zero_adv_skipped"] == 4 and results[0]["zero_adv_skipped"] == 0
    assert results[0]["grad_norm"] == results[1]["grad_norm"] == 0.0 and results[1]["loss"] == 0.0
    assert "entropy" in results[0] and "entropy" not in results[1]  # nothing ran: no token to measure
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_implementations_take_the_same_step(tokenizer, impl):
    seqs = make_sequences(6, seed=7)
    models = []
    for which in ("loop", impl):
        learner = make_learner(tiny_model(tokenizer), trainer=TrainerConfig(lr=1e-2, optimizer_impl=which,
                                                                            weight_decay=0.1))
        d = learner.optimizer.defaults
        assert (bool(d["fused"]), bool(d["foreach"])) == {"loop": (False, False), "fused": (True, False),
                                                          "foreach": (False, True)}[which]
        learner.train_on(seqs)
        learner.train_on(seqs)
        models.append(learner.model)
    moved = 0
    before = tiny_model(tokenizer).state_dict()
    # atol 1e-5 against steps of lr = 1e-2: the key-projection bias's gradient is zero up to rounding (softmax ignores a
    # per-query constant), and Adam scales that rounding up to ~lr, so the two kernels' last-bit differences show there
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
        moved += int(not torch.equal(a.detach(), before[name]))
    assert moved > 0


def test_adamw_auto_is_fused_on_cpu(tokenizer):
    learner = make_learner(tiny_model(tokenizer))
    assert learner.optimizer.defaults["fused"] is True


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    seqs = make_sequences(4, seed=5)
    grads = []
    for ckpt in (False, True):
        cfg = ModelConfig(gradient_checkpointing=ckpt)
        learner = make_learner(tiny_model(tokenizer), model_cfg=cfg)
        learner.loss_and_grads(seqs)
        grads.append([p.grad.clone() for p in learner.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", ["row", 1.0])
def test_compute_logprobs_matches_hf_full_logits(tokenizer, temperature):
    model = tiny_model(tokenizer)
    learner = make_learner(model, trainer=TrainerConfig(micro_batch_size=3))
    seqs = make_sequences(7, seed=6)
    got = learner.compute_logprobs(seqs, temperature=temperature)
    with torch.no_grad():
        want = reference_logprobs(model, seqs, temperature)
    assert len(got) == len(seqs)
    for g, w, s in zip(got, want, seqs):
        assert g.dtype == torch.float32 and g.shape == (len(s.response_ids),)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_truncated_is_weights_path(tokenizer, is_level):
    model = tiny_model(tokenizer)
    model64 = copy.deepcopy(model).double()
    algo = AlgorithmConfig(is_level=is_level, is_clip=1.5, logprob_temperature="one")
    learner = make_learner(model, algo)
    seqs = make_sequences(5, seed=7)
    # Rollout log-probs near the learner's (at each row's temperature, as an engine would report them).
    with torch.no_grad():
        rollout = reference_logprobs(model64, seqs, "row")
    g = torch.Generator().manual_seed(1)
    for s, r in zip(seqs, rollout):
        s.rollout_logprobs = (r + 0.5 * torch.randn(r.shape, generator=g, dtype=torch.float64)).tolist()
    metrics = learner.loss_and_grads(seqs)
    ref_loss, _, is_w, *_ = reference_loss(model64, seqs, algo)
    assert metrics["is_weight_mean"] == pytest.approx(float(is_w.mean()), rel=1e-5)
    assert bool((is_w == 1.5).any()) and bool((is_w < 1.0).any())  # truncation is exercised
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_grads_close(learner.model, model64)


def test_is_needs_rollout_logprobs(tokenizer):
    learner = make_learner(tiny_model(tokenizer), AlgorithmConfig(is_level="token"))
    seqs = make_sequences(2)
    seqs[0].rollout_logprobs = []
    with pytest.raises(ValueError, match="rollout_logprobs"):
        learner.train_on(seqs)


@pytest.mark.parametrize("kl", ["k3", "k2"])
def test_kl_path_with_reference_model(tokenizer, kl):
    model = tiny_model(tokenizer)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model64, ref64 = copy.deepcopy(model).double(), copy.deepcopy(ref_model).double()
    algo = AlgorithmConfig(kl_beta=0.3, kl_estimator=kl)
    learner = make_learner(model, algo, TrainerConfig(micro_batch_size=2), ref_model=ref_model)
    seqs = make_sequences(5, seed=8)
    seqs[1].advantage = 0.0  # its KL term has a gradient: it must run
    metrics = learner.loss_and_grads(seqs)
    assert metrics["zero_adv_skipped"] == 0
    ref_loss, _, _, ref_lp, lp = reference_loss(model64, seqs, algo, ref_model64=ref64)
    d = lp - ref_lp
    expected_kl = (torch.expm1(-d) + d) if kl == "k3" else 0.5 * d.square()
    assert metrics["kl"] == pytest.approx(float(expected_kl.mean()), rel=1e-4)
    assert metrics["kl"] > 1e-4
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_grads_close(learner.model, model64)
    assert all(p.grad is None for p in ref_model.parameters())


def test_kl_needs_a_reference_model(tokenizer):
    with pytest.raises(ValueError, match="reference model"):
        make_learner(tiny_model(tokenizer), AlgorithmConfig(kl_beta=0.1))


# ----------------------------------------------------------------------------------------------------
# optimisation step, schedule, state
# ----------------------------------------------------------------------------------------------------

def test_train_on_applies_clipped_adamw_step(tokenizer):
    model = tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    trainer = TrainerConfig(lr=1e-3, grad_clip=0.5, adam_beta1=0.8, adam_beta2=0.9, weight_decay=0.1)
    learner = make_learner(model, trainer=trainer)
    seqs = make_sequences(5, seed=9)
    metrics = learner.train_on(seqs)
    reference_loss(model64, seqs, learner.algo)
    ref_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model64.parameters()))
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert metrics["skipped_nonfinite"] is False and metrics["lr"] == 1e-3
    # First AdamW step: m/sqrt(v) = g/|g| per element (the clip scale cancels), so the update is
    # -lr * sign(g) (up to eps) plus decoupled weight decay on matrices only.
    for name, p in model.named_parameters():
        g = dict(model64.named_parameters())[name].grad.float()
        decay = 0.1 if p.dim() >= 2 else 0.0
        scaled = g * min(1.0, 0.5 / (ref_norm + 1e-6))
        expected = before[name] * (1 - 1e-3 * decay) - 1e-3 * scaled / (scaled.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-5, msg=name)


def test_nonfinite_loss_skips_the_step(tokenizer):
    model = tiny_model(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    learner = make_learner(model, trainer=TrainerConfig(lr=1e-2))
    seqs = make_sequences(4, seed=10)
    seqs[1].advantage = float("nan")
    metrics = learner.train_on(seqs)
    assert metrics["skipped_nonfinite"] is True
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not learner.optimizer.state
    seqs[1].advantage = 1.0
    assert learner.train_on(seqs)["skipped_nonfinite"] is False
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_updates_per_step_makes_later_updates_off_policy(tokenizer):
    seqs = make_sequences(8, seed=11)
    # One update: the ratio is exactly 1, nothing is clipped. Two updates with a big step: the second
    # mini-batch is scored against the log-probs from BEFORE the first update: its ratio leaves the clip band.
    one = make_learner(tiny_model(tokenizer), trainer=TrainerConfig(lr=0.05)).train_on(seqs)
    two_updates = TrainerConfig(lr=0.05, updates_per_step=2)
    two = make_learner(tiny_model(tokenizer), trainer=two_updates).train_on(seqs)
    assert one["clip_frac"] == 0.0
    assert two["clip_frac"] > 0.0
    assert two["num_tokens"] == one["num_tokens"] == sum(len(s.response_ids) for s in seqs)


def test_lr_factor_values():
    t = TrainerConfig(max_steps=5, warmup_steps=2, min_lr_ratio=0.1, lr_schedule="cosine")
    assert [lr_factor(s, t) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    t.lr_schedule = "linear"
    t.max_steps = 6
    assert [lr_factor(s, t) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.7, 0.4, 0.1])
    t.lr_schedule = "constant"
    assert [lr_factor(s, t) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    t.warmup_steps, t.lr_schedule, t.max_steps = 0, "cosine", 3
    assert [lr_factor(s, t) for s in range(3)] == pytest.approx([1.0, 0.55, 0.1])


def test_learner_follows_the_schedule_and_state_round_trips(tokenizer, tmp_path):
    trainer = TrainerConfig(lr=2e-3, max_steps=5, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    learner = make_learner(tiny_model(tokenizer), trainer=trainer)
    seqs = make_sequences(3, seed=12)
    lrs = [learner.train_on(seqs)["lr"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3])

    # Resume: a learner built from another init, given the saved weights + state, continues identically.
    model = tiny_model(tokenizer, seed=5)
    model.load_state_dict(learner.full_model_state_dict())
    resumed = make_learner(model, trainer=trainer)
    learner.save_optimizer(tmp_path / "optimizer")
    resumed.load_optimizer(tmp_path / "optimizer")
    resumed.load_state_dict(learner.state_dict())
    assert resumed.step == learner.step == 3
    a, b = learner.train_on(seqs), resumed.train_on(seqs)
    assert a["lr"] == b["lr"] == pytest.approx(2e-3 * 0.55)
    for (name, p), (_, q) in zip(learner.named_weights(), resumed.named_weights()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    names = [n for n, _ in learner.named_weights()]
    assert names == [n for n, _ in learner.model.named_parameters()]
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"step": 1})


def test_bf16_compute_on_cpu_tracks_fp32(tokenizer):
    seqs = make_sequences(4, seed=13)
    losses = []
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(dtype=dtype)
        model = tiny_model(tokenizer)
        learner = make_learner(model, model_cfg=cfg)
        assert learner.compute_dtype == getattr(torch, dtype)
        m = learner.train_on(seqs)
        assert not m["skipped_nonfinite"]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        losses.append((m["loss"], m["entropy"]))
    assert losses[1][0] == pytest.approx(losses[0][0], abs=2e-2)
    assert losses[1][1] == pytest.approx(losses[0][1], rel=2e-2)


def test_bf16_casts_each_weight_once_per_update(tokenizer):
    """Under autocast each linear's fp32 weight is cast to bf16 once per update, not once per micro-batch (the
    casts are kept for the whole update), and the step is the same as with a fresh cast per micro-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountParameterCasts(TorchDispatchMode):
        def __init__(self, params):
            super().__init__()
            self.params, self.casts = params, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.params:
                self.casts += 1
            return func(*args, **(kwargs or {}))

    seqs = make_sequences(12, seed=21)
    grads = {}
    for kept in (True, False):
        model = tiny_model(tokenizer)
        learner = make_learner(model, trainer=TrainerConfig(micro_batch_size=4),
                               model_cfg=ModelConfig(dtype="bfloat16"))
        assert len(learner._micro_batches(seqs)) == 3
        if not kept:  # what the learner did before: every micro-batch's autocast cast the weights again
            autocast = learner._autocast
            learner._autocast = lambda enabled=True, autocast=autocast: (
                autocast() if enabled else contextlib.nullcontext())
        counter = CountParameterCasts({p.untyped_storage().data_ptr() for p in model.parameters()})
        with counter:
            learner.loss_and_grads(seqs)
        linear_params = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head
                            for p in (m.weight, m.bias) if p is not None)
        # The LM head's weight is not cast at all: the CPU loss takes the fp32 master (Learner.head_dtype).
        assert counter.casts == (linear_params if kept else 3 * linear_params)
        grads[kept] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


def test_bf16_on_cpu_hands_the_loss_the_fp32_master_head(tokenizer):
    """Under bf16 autocast on CPU the loss gets the LM head's fp32 master weight itself, not a [V, H] bf16 copy
    (the CPU loss computes in fp32 anyway), and fp32 hidden rows; the decoder still runs under autocast."""
    model = tiny_model(tokenizer)
    learner = make_learner(model, model_cfg=ModelConfig(dtype="bfloat16"))
    batch = pack_sequences(make_sequences(4, seed=5), vocab_size=learner.vocab_size, share_prompts=True)
    hidden, weight = learner._hidden(learner._policy, batch)
    assert weight is lm_head_weight(learner.model) and weight.dtype == torch.float32
    assert hidden.dtype == torch.float32 and hidden.shape == (batch.num_tokens, weight.shape[1])
    assert learner._autocast().fast_dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_sync_check_leaves_out_a_few_outlier_tokens_but_not_a_broad_difference(tokenizer, dtype):
    """The check's statistic is the mean |engine - learner| log-prob with the 5% of tokens that differ most left
    out: on a 40-token probe two tokens off by 5 nats (bf16 rounding does that to tail tokens) pass, a third fails,
    and so does a 0.03 shift of every token. The figures are checked against a plain sorted-list reference."""
    from erpo_fast.config import Config
    from erpo_fast.errors import WeightSyncError
    from erpo_fast.rollout import check_probe

    learner = make_learner(tiny_model(tokenizer), model_cfg=ModelConfig(dtype=dtype))
    probe = make_sequences(4, seed=3, max_response=1)
    for i, seq in enumerate(probe):
        seq.response_ids = [(5 + 7 * i + 3 * t) % 55 + 3 for t in range(10)]
    exact = torch.cat(learner.compute_logprobs(probe, temperature=1.0))

    def check(offsets):
        engine = (exact + torch.tensor(offsets)).tolist()
        for seq, part in zip(probe, torch.tensor(engine).split(10)):
            seq.rollout_logprobs = part.tolist()
        diffs = sorted(abs(e - float(x)) for e, x in zip(engine, exact))
        return check_probe(learner, probe, Config(), step=10), sum(diffs[:38]) / 38, sum(diffs) / 40

    two = [0.0] * 40
    two[7], two[23] = 5.0, -5.0
    stats, trimmed, mean = check(two)
    assert stats["tokens"] == 40 and stats["max_abs_diff"] == pytest.approx(5.0, abs=1e-5)
    assert stats["trimmed_mean_abs_diff"] == pytest.approx(trimmed, abs=1e-6) and trimmed < 1e-6
    assert stats["mean_abs_diff"] == pytest.approx(mean, abs=1e-6) == pytest.approx(0.25, abs=1e-5)
    three = list(two)
    three[31] = 5.0
    with pytest.raises(WeightSyncError, match=r"by 0\.1316 on average over the 38 of 40 probe tokens"):
        check(three)
    with pytest.raises(WeightSyncError, match=r"by 0\.03 on average"):
        check([0.03] * 40)
    with pytest.raises(WeightSyncError, match="1 of 40 probe log-probs are not finite"):
        check([0.0] * 39 + [float("nan")])


def test_learner_input_validation(tokenizer):
    learner = make_learner(tiny_model(tokenizer))
    with pytest.raises(ValueError, match="at least one sequence"):
        learner.train_on([])
    seqs = make_sequences(2)
    seqs[1].seq_key = seqs[0].seq_key
    with pytest.raises(ValueError, match="unique"):
        learner.train_on(seqs)
    same = tiny_model(tokenizer)
    with pytest.raises(ValueError, match="separate"):
        make_learner(same, AlgorithmConfig(kl_beta=0.1), ref_model=same)
    with pytest.raises(ValueError, match="max_len"):
        Learner(tiny_model(tokenizer), AlgorithmConfig(), TrainerConfig(), ModelConfig(), device="cpu", max_len=0)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_load_model_never_holds_the_weights_twice(tmp_path):
    """The copy out of the file mapping drops each tensor's file pages as it goes: the load's peak resident memory
    stays near what the process holds after it, instead of one more copy of the weights above it."""
    import subprocess
    import sys

    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2))
    weights = sum(p.numel() * 4 for p in model.parameters())  # ~90 MB
    model.save_pretrained(tmp_path)
    build_char_tokenizer().save_pretrained(tmp_path)
    code = ("from erpo_fast.models import load_model\n"
            f"m, _ = load_model({str(tmp_path)!r}, dtype='float32', device='cpu')\n"
            "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(int(status['VmHWM'].split()[0]) * 1024, int(status['VmRSS'].split()[0]) * 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    peak, now = map(int, done.stdout.split())
    assert peak - now < 0.3 * weights, (peak, now, weights)
