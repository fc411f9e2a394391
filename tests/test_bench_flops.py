"""``bench_vs_trl.learner_flops`` (the FLOP count behind the learner's achieved FLOP/s in bench_memory and
bench_vs_trl) against torch's own FLOP counter on a real ``Learner.loss_and_grads``: its matmul part, 6 x decoder
parameters x packed tokens + 6 x V x H per trained token, must be what the learner's matmuls actually did.
(torch's counter does not count CPU attention kernels, so the attention term is checked for its sharing rule.)"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.bench_vs_trl import learner_flops
from erpo_fast.batch import RolloutSequence
from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
from erpo_fast.learner import Learner


def _learner(micro_batch_size=8, micro_batch_tokens=0):
    config = Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Learner(Qwen2ForCausalLM(config), AlgorithmConfig(),
                   TrainerConfig(micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens),
                   ModelConfig(), device="cpu", max_len=64)


def _step(prompt_lengths, response_lengths, n=8, seed=0):
    rng = random.Random(seed)
    seqs = []
    for g, (lo, hi) in enumerate(prompt_lengths):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))]
        seqs += [RolloutSequence(prompt, [rng.randrange(3, 500) for _ in range(rng.randint(*response_lengths))],
                                 [], 1.0, rng.gauss(0, 1), g * n + j) for j in range(n)]
    return seqs


@pytest.mark.parametrize("micro_batch_size, micro_batch_tokens", [(8, 0), (3, 0), (16, 150)])
def test_matmul_flops_are_what_the_learner_ran(micro_batch_size, micro_batch_tokens):
    learner = _learner(micro_batch_size, micro_batch_tokens)
    seqs = _step([(20, 40), (30, 30), (5, 12)], (8, 16))
    with FlopCounterMode(display=False) as counter:
        learner.loss_and_grads(seqs)
    counted = counter.get_total_flops()
    assert counted > 0
    ours = learner_flops(SimpleNamespace(learner=learner), seqs)
    # decoder_params also holds the norms' weights and the q/k/v biases, which no matmul multiplies (0.5% of the
    # parameters here, 0.03% at SmolLM2-135M's shape); beyond those the counts agree exactly
    vectors = sum(p.numel() for p in learner.model.parameters() if p.dim() == 1)
    assert ours["total"] - ours["attention"] - 6 * vectors * ours["packed_tokens"] == counted


def test_a_shared_prompt_is_counted_once():
    learner = _learner()
    seqs = _step([(100, 100)], (16, 16))  # one group, 100-token prompt, 8 responses of 16: suffix blocks on CPU
    ours = learner_flops(SimpleNamespace(learner=learner), seqs)
    h, layers, p, r = 64, 2, 100, 16
    assert ours["attention"] == 6 * h * layers * (p * p + 8 * (2 * r * p + r * r))
    assert ours["packed_tokens"] == p + 8 * r


def test_op_seconds_splits_the_matrix_products_by_phase():
    """bench_vs_trl --profile: the matmul and attention self times it files under generation (inside the
    generate range) and learning (the rest) add up to the profiler's own per-operator totals."""
    from bench.bench_vs_trl import GENERATE_RANGE, MATMUL_OPS, op_seconds, profiled

    a, b = torch.randn(64, 96), torch.randn(96, 80)
    q = torch.randn(1, 2, 24, 16)
    with profiled(True) as prof:
        with torch.profiler.record_function(GENERATE_RANGE):
            for _ in range(3):
                torch.mm(a, b)
        torch.nn.functional.linear(a, b.T, torch.zeros(80))  # addmm, in the learning phase
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    split = op_seconds(prof)
    totals = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    matmul_total = sum(t for k, t in totals.items() if k in MATMUL_OPS)
    attention_total = sum(t for k, t in totals.items() if "scaled_dot_product" in k)
    assert split["generation"]["matmul_s"] > 0 and split["learning"]["matmul_s"] > 0
    assert split["generation"]["attention_s"] == 0 and split["learning"]["attention_s"] > 0
    assert split["generation"]["matmul_s"] == pytest.approx(totals["aten::mm"])
    assert split["generation"]["matmul_s"] + split["learning"]["matmul_s"] == pytest.approx(matmul_total)
    assert split["learning"]["attention_s"] == pytest.approx(attention_total)
    with profiled(False) as nothing:
        assert nothing is None
