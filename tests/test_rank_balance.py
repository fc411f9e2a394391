"""Evening the learner's work out over ranks (erpo_fast/rank_balance.py).

The plan against a brute-force optimum (longest processing time first is within 4/3 of it), and two gloo ranks
whose work is as uneven as it gets (every sequence that runs is on rank 0; rank 1's groups are uniform, left out
by trainer.skip_zero_advantage): with the balancing on, rank 1 takes half the work, and the weights and metrics
still equal one process's with the whole batch; with it off, the imbalance metric says 2.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_learner_fsdp import MAX_LEN, TINY, WORLD, spawn_ranks

from erpo_fast.batch import RolloutSequence
from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
from erpo_fast.learner import Learner
from erpo_fast.models import build_tiny_qwen2
from erpo_fast.rank_balance import assign_units, prompt_groups
from erpo_fast.tokenizer import build_char_tokenizer


def _loads(costs, plan):
    return [sum(costs[home][i] for home, i in got) for got in plan]


def test_every_unit_is_handed_out_once_and_the_largest_load_is_within_4_3_of_the_optimum():
    rng = random.Random(0)
    for _ in range(200):
        world = rng.choice([2, 3, 4])
        costs = [[rng.randint(1, 40) for _ in range(rng.randint(0, 3))] for _ in range(world)]
        units = [(home, i) for home, per in enumerate(costs) for i in range(len(per))]
        if not units or len(units) > 8:
            continue
        plan = assign_units(costs)
        assert sorted(u for got in plan for u in got) == sorted(units)
        assert all(got == sorted(got) for got in plan)
        assert plan == assign_units(costs)  # every rank computes the same plan
        flat = [costs[h][i] for h, i in units]
        best = min(max(sum(c for c, r in zip(flat, dest) if r == k) for k in range(world))
                   for dest in itertools.product(range(world), repeat=len(flat)))
        assert max(_loads(costs, plan)) <= (4 / 3 - 1 / (3 * world)) * best + 1e-9, (costs, plan)
        assert max(_loads(costs, plan)) <= max(sum(c) for c in costs)  # never worse than leaving them home


def test_units_stay_home_when_moving_them_would_not_help():
    costs = [[5, 3], [4, 4]]
    assert assign_units(costs) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    # Longest first alone would give [5, 7] here (the two 3s apart, then the 2s): worse than [6, 6] at home.
    assert assign_units([[3, 3], [2, 2, 2]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1), (1, 2)]]
    # All the work on rank 0: half of it goes to rank 1.
    plan = assign_units([[6, 5, 4, 3], []])
    assert _loads([[6, 5, 4, 3], []], plan) == [9, 9]


def _seq(prompt, key):
    return RolloutSequence(prompt_ids=prompt, response_ids=[7, 8], rollout_logprobs=[], temperature=1.0,
                           advantage=1.0, seq_key=key)


def test_a_group_is_the_consecutive_samples_of_one_prompt_when_prompts_are_shared():
    seqs = [_seq([3, 4], 0), _seq([3, 4], 1), _seq([5], 2), _seq([3, 4], 3)]
    assert prompt_groups(seqs, share_prompts=True) == [[0, 1], [2], [3]]
    assert prompt_groups(seqs, share_prompts=False) == [[0], [1], [2], [3]]


# 8 groups of 2 samples. Rank 0 holds the groups with a nonzero advantage, rank 1 the uniform ones (advantage 0).
# Two updates per step: global mini-batch k is the union of the ranks' k-th halves, as in one process's order.
GROUPS = 8
RANK_GROUPS = [[0, 1, 4, 5], [2, 3, 6, 7]]


def make_groups() -> list[RolloutSequence]:
    g = torch.Generator().manual_seed(0)
    out = []
    for group in range(GROUPS):
        prompt = torch.randint(3, 58, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for j in range(2):
            r = int(torch.randint(1, 6, (1,), generator=g))
            uniform = group in RANK_GROUPS[1]
            out.append(RolloutSequence(
                prompt_ids=prompt, response_ids=torch.randint(3, 58, (r,), generator=g).tolist(),
                rollout_logprobs=(-4.0 + 0.5 * torch.randn(r, generator=g)).tolist(),
                temperature=float(0.6 + 0.8 * torch.rand(1, generator=g)),
                advantage=0.0 if uniform else float(torch.randn(1, generator=g)), seq_key=2 * group + j))
    return out


def _learner(balance: bool) -> Learner:
    trainer = TrainerConfig(lr=1e-3, grad_clip=1.0, micro_batch_size=2, updates_per_step=2, balance_ranks=balance)
    return Learner(build_tiny_qwen2(build_char_tokenizer(), TINY, 0), AlgorithmConfig(eps_low=0.1, eps_high=0.1),
                   trainer, ModelConfig(), device="cpu", max_len=MAX_LEN)


def run(sequences: list[RolloutSequence], balance: bool) -> dict:
    learner = _learner(balance)
    metrics = [learner.train_on(sequences) for _ in range(2)]
    return dict(metrics=metrics, weights={n: w.clone() for n, w in learner.named_weights()})


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        seqs = make_groups()
        local = [s for g in RANK_GROUPS[rank] for s in seqs[2 * g:2 * g + 2]]
        torch.save({balance: run(local, balance) for balance in (True, False)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_uneven_ranks_share_the_work_and_match_one_process(tmp_path):
    single = run(make_groups(), balance=True)
    spawn_ranks(_worker, str(tmp_path / "store"), str(tmp_path), what="rank balance")
    for r in range(WORLD):
        ranks = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for balance, result in ranks.items():
            for got, want in zip(result["metrics"], single["metrics"]):
                assert want["zero_adv_skipped"] == 8 and want["num_sequences"] == 16
                imbalance = got.pop("rank_imbalance")
                # Off: rank 0 runs everything, rank 1 nothing (max / mean = 2). On: the two groups of each update
                # go one to a rank (sizes differ, so not exactly 1).
                assert (imbalance < 1.5) if balance else imbalance == 2.0, (balance, imbalance)
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (r, balance, key)
            for name, w in single["weights"].items():
                torch.testing.assert_close(result["weights"][name], w, rtol=0, atol=1e-6,
                                           msg=f"rank {r}, balance {balance}: {name}")
