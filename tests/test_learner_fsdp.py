"""FSDP2 learner: 2 gloo processes on CPU, each with part of the batch, must match 1 process with all of it.

What must hold for that: the loss normaliser is global (token/sequence counts all-reduced), FSDP2's gradient
averaging is undone, ranks with fewer micro-batches still join every collective, and the full weights /
optimizer state are gathered from the shards (tied embeddings included). The resume path (load full weights +
optimizer state into a fresh sharded learner) is checked too.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
from erpo_fast.learner import Learner, RolloutSequence
from erpo_fast.models import build_tiny_qwen2
from erpo_fast.tokenizer import build_char_tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
]

TINY = ModelConfig(tiny_hidden_size=32, tiny_layers=2, tiny_heads=4, tiny_kv_heads=2,
                   tiny_intermediate_size=64)
MAX_LEN = 8
WORLD = 2

# name -> (algorithm overrides, trainer overrides, each rank's sequence indices, single-process order)
CASES = {
    # Uneven split: rank 0 has 3 micro-batches, rank 1 only 2 (it runs a placeholder one). KL to a ref model.
    "token_mean_kl_uneven": (
        dict(kl_beta=0.2),
        dict(micro_batch_size=2),
        [[0, 1, 2, 3, 4], [5, 6, 7]],
        list(range(8)),
    ),
    # Two updates per step: global mini-batch k is the union of every rank's k-th half. IS weights, GRPO agg.
    "seq_mean_is_two_updates": (
        dict(loss_agg="seq_mean_token_mean", is_level="token", is_clip=1.5, eps_low=0.1, eps_high=0.1),
        dict(micro_batch_size=2, updates_per_step=2),
        [[0, 1, 4, 5], [2, 3, 6, 7]],
        list(range(8)),
    ),
}




def make_sequences():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        p = int(torch.randint(1, 6, (1,), generator=g))
        r = int(torch.randint(1, 6, (1,), generator=g))
        out.append(RolloutSequence(
            prompt_ids=torch.randint(3, 58, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, 58, (r,), generator=g).tolist(),
            rollout_logprobs=(-4.0 + 0.5 * torch.randn(r, generator=g)).tolist(),
            temperature=float(0.6 + 0.8 * torch.rand(1, generator=g)),
            advantage=float(torch.randn(1, generator=g)),
            seq_key=i,
        ))
    return out


def build_learner(case: str, seed: int = 0) -> Learner:
    algo_kw, trainer_kw, _, _ = CASES[case]
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TINY, seed)
    algo = AlgorithmConfig(**algo_kw)
    ref = None
    if algo.kl_beta > 0:
        ref = build_tiny_qwen2(tokenizer, TINY, 0)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
            for p in ref.parameters():
                p.mul_(1.05)
    trainer = TrainerConfig(lr=1e-3, grad_clip=1.0, **trainer_kw)
    return Learner(model, algo, trainer, copy.deepcopy(TINY), device="cpu", max_len=MAX_LEN, ref_model=ref)


def run_case(case: str, indices: list[int]) -> dict:
    """Two steps, then the gathered state; then resume into a fresh learner and take a third step on both."""
    seqs = make_sequences()
    local = [seqs[i] for i in indices]
    learner = build_learner(case)
    metrics = [learner.train_on(local) for _ in range(2)]
    logprobs = learner.compute_logprobs(local)
    weights = {n: w.clone() for n, w in learner.named_weights()}
    full_state = learner.full_model_state_dict()
    optim_state = learner.state_dict()

    resumed = build_learner(case, seed=7)
    resumed.load_full_model_state_dict(full_state)
    resumed.load_state_dict(optim_state)
    metrics.append(learner.train_on(local))
    resumed_metrics = resumed.train_on(local)
    return dict(metrics=metrics, logprobs=logprobs, weights=weights, full_keys=sorted(full_state),
                optim=optim_state["optimizer"], step3=dict(learner.named_weights()),
                resumed_step3=dict(resumed.named_weights()), resumed_metrics=resumed_metrics)


def _worker(rank: int, case: str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = run_case(case, CASES[case][2][rank])
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(case: str, tmp_path: Path) -> list[dict]:
    # fork: the children reuse this process's imports (torch + transformers take seconds to import).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_worker, args=(case, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method=method)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail(f"FSDP workers did not finish within 180 s ({case})")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(case, tmp_path):
    single = run_case(case, CASES[case][3])
    ranks = run_two_ranks(case, tmp_path)

    for r, result in enumerate(ranks):
        # Every rank reports the same global metrics as the single process.
        for got, want in zip(result["metrics"], single["metrics"]):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (r, key)
        # Full (gathered) weights after 2 steps equal the single-process weights; tied embedding once.
        assert result["weights"].keys() == single["weights"].keys()
        assert "lm_head.weight" not in result["weights"]
        for name, w in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], w, rtol=0, atol=1e-6, msg=f"rank {r}: {name}")
        assert result["full_keys"] == single["full_keys"]
        # Gathered optimizer state (FQN-keyed) equals the unsharded one.
        assert result["optim"]["state"].keys() == single["optim"]["state"].keys()
        for fqn, state in single["optim"]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(result["optim"]["state"][fqn][key], value, rtol=1e-5, atol=1e-7,
                                           msg=f"rank {r}: {fqn}.{key}")
        # Resume under FSDP continues exactly like the uninterrupted learner, and like the single process.
        for name, w in result["step3"].items():
            torch.testing.assert_close(result["resumed_step3"][name], w, rtol=0, atol=1e-7, msg=name)
            torch.testing.assert_close(w, single["step3"][name], rtol=0, atol=2e-6, msg=name)
        assert result["resumed_metrics"]["loss"] == pytest.approx(result["metrics"][2]["loss"], rel=1e-6)

    # Each rank's log-probs of its own sequences equal the single process's for the same sequences.
    single_lp = dict(zip(CASES[case][3], single["logprobs"]))
    for r, result in enumerate(ranks):
        for i, lp in zip(CASES[case][2][r], result["logprobs"]):
            torch.testing.assert_close(lp, single_lp[i], rtol=1e-5, atol=1e-6)
