"""FSDP2 learner: 2 gloo processes on CPU, each with part of the batch, must match 1 process with all of it.

What must hold for that: the loss normaliser is global (token/sequence counts all-reduced), FSDP2's gradient
averaging is undone, ranks with fewer micro-batches still join every collective, and the full weights /
optimizer state are gathered from the shards (tied embeddings included). The resume path (the rank-0 weight
export + each rank's torch.distributed.checkpoint optimizer shards into a fresh sharded learner) is checked too,
and each rank's saved shard holds about half of the optimizer state.
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

from erpo_fast import lora
from erpo_fast.batch import RolloutSequence
from erpo_fast.config import AlgorithmConfig, BuiltinConfig, ModelConfig, TrainerConfig
from erpo_fast.learner import Learner
from erpo_fast.models import build_tiny_qwen2
from erpo_fast.tokenizer import build_char_tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
]

TINY = BuiltinConfig(hidden_size=32, layers=2, heads=4, kv_heads=2,
                   intermediate_size=64)
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
    # LoRA (model cfg below): the base sharded and frozen, the adapters trained; KL to the adapters-off base.
    "lora_kl_uneven": (
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




LORA_CASES = {"lora_kl_uneven": ModelConfig(lora_rank=4, lora_alpha=8.0)}


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


def build_learner(case: str, model=None) -> Learner:
    algo_kw, trainer_kw, _, _ = CASES[case]
    tokenizer = build_char_tokenizer()
    model_cfg = LORA_CASES.get(case, ModelConfig())
    if model is None:
        model = build_tiny_qwen2(tokenizer, TINY, 0)
        if model_cfg.lora_rank:  # adapters with B != 0 (B = 0 would leave A without a gradient)
            lora.add_adapters(model, model_cfg, seed=0)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".lora_B." in name:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
    algo = AlgorithmConfig(**algo_kw)
    ref = None
    if algo.kl_beta > 0 and not model_cfg.lora_rank:
        ref = build_tiny_qwen2(tokenizer, TINY, 0)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
            for p in ref.parameters():
                p.mul_(1.05)
    trainer = TrainerConfig(lr=1e-3, grad_clip=1.0, **trainer_kw)
    return Learner(model, algo, trainer, model_cfg, device="cpu", max_len=MAX_LEN, ref_model=ref)


def run_case(case: str, indices: list[int], ckpt_dir: Path) -> dict:
    """Two steps, then a checkpoint (rank-0 weight export, sharded optimizer); then resume into a fresh learner
    and take a third step on both."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    seqs = make_sequences()
    local = [seqs[i] for i in indices]
    learner = build_learner(case)
    metrics = [learner.train_on(local) for _ in range(2)]
    logprobs = learner.compute_logprobs(local)
    weights = {n: w.clone() for n, w in learner.named_weights()}
    full_state = learner.full_model_state_dict()  # rank 0 only
    adapters = learner.adapter_state_dict() if learner.lora else None  # rank 0 only
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        torch.save(full_state, ckpt_dir / "model.pt")
        torch.save(adapters, ckpt_dir / "adapters.pt")
    learner.save_optimizer(ckpt_dir / "optimizer")
    learner_state = learner.state_dict()
    # The test gathers the full optimizer state to compare it with the single process's (the learner never does).
    optim = copy.deepcopy(get_optimizer_state_dict(learner._policy, learner.optimizer,
                                                   options=StateDictOptions(full_state_dict=True)))  # not live
    if dist.is_initialized():
        dist.barrier()

    if learner.lora:  # a LoRA checkpoint: the base model, and the adapters on top
        model = build_tiny_qwen2(build_char_tokenizer(), TINY, 0)
        lora.add_adapters(model, LORA_CASES[case], seed=7)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in torch.load(ckpt_dir / "adapters.pt", weights_only=True).items():
                params[name].copy_(t)
    else:
        model = build_tiny_qwen2(build_char_tokenizer(), TINY, 7)
        model.load_state_dict(torch.load(ckpt_dir / "model.pt", weights_only=True))
    resumed = build_learner(case, model=model)
    resumed.load_optimizer(ckpt_dir / "optimizer")
    resumed.load_state_dict(learner_state)
    metrics.append(learner.train_on(local))
    resumed_metrics = resumed.train_on(local)
    return dict(metrics=metrics, logprobs=logprobs, weights=weights, full_keys=sorted(full_state),
                optim=optim, step3=dict(learner.named_weights()),
                resumed_step3=dict(resumed.named_weights()), resumed_metrics=resumed_metrics)


def _worker(rank: int, case: str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ckpt_dir = Path(out_dir) / "ckpt"
        ckpt_dir.mkdir(exist_ok=True)
        result = run_case(case, CASES[case][2][rank], ckpt_dir)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, *args, what: str) -> None:
    """Run ``worker(rank, *args)`` in WORLD processes; fail the test if they take over 180 s."""
    # fork: the children reuse this process's imports (torch + transformers take seconds to import).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail(f"FSDP workers did not finish within 180 s ({what})")


def run_two_ranks(case: str, tmp_path: Path) -> list[dict]:
    spawn_ranks(_worker, case, str(tmp_path / "store"), str(tmp_path), what=case)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(case, tmp_path):
    (tmp_path / "single").mkdir()
    single = run_case(case, CASES[case][3], tmp_path / "single")
    ranks = run_two_ranks(case, tmp_path)

    for r, result in enumerate(ranks):
        # Every rank reports the same global metrics as the single process.
        for got, want in zip(result["metrics"], single["metrics"]):
            got = dict(got)
            assert got.pop("rank_imbalance") >= 1.0  # ranks only: max over ranks of the packed tokens / their mean
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (r, key)
        # Full (gathered) weights after 2 steps equal the single-process weights; tied embedding once.
        assert result["weights"].keys() == single["weights"].keys()
        assert "lm_head.weight" not in result["weights"]
        for name, w in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], w, rtol=0, atol=1e-6, msg=f"rank {r}: {name}")
        # The HF export is gathered to rank 0 only.
        assert result["full_keys"] == (single["full_keys"] if r == 0 else [])
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


# Wide enough that tensor data, not the per-tensor record overhead of the .distcp files, dominates their size.
WIDE = BuiltinConfig(hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate_size=512)


def _shard_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        learner = Learner(build_tiny_qwen2(build_char_tokenizer(), WIDE, 0), AlgorithmConfig(),
                          TrainerConfig(lr=1e-3), ModelConfig(), device="cpu", max_len=MAX_LEN)
        learner.train_on(make_sequences()[rank::WORLD])
        learner.save_optimizer(Path(out_dir) / "optimizer")
    finally:
        dist.destroy_process_group()


def test_each_rank_saves_about_half_of_the_optimizer_state(tmp_path):
    """Sharded checkpoints: with 2 ranks, each rank's torch.distributed.checkpoint file holds about half of the
    AdamW state that one process saves (nobody gathers the full state), and the shards load back as it."""
    spawn_ranks(_shard_worker, str(tmp_path / "store"), str(tmp_path), what="sharded optimizer save")
    single = Learner(build_tiny_qwen2(build_char_tokenizer(), WIDE, 0), AlgorithmConfig(), TrainerConfig(lr=1e-3),
                     ModelConfig(), device="cpu", max_len=MAX_LEN)
    single.train_on(make_sequences())
    single.save_optimizer(tmp_path / "single")
    full_bytes = sum(v.numel() * v.element_size() for s in single.optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor))
    single_file = (tmp_path / "single" / "__0_0.distcp").stat().st_size
    assert 1.0 <= single_file / full_bytes < 1.05  # one process: the whole state in one file
    for r in range(WORLD):
        shard = (tmp_path / "optimizer" / f"__{r}_0.distcp").stat().st_size
        assert 0.45 < shard / full_bytes < 0.55, (r, shard, full_bytes)
    # The two shards load into one unsharded learner (resharding on load) and give the full state back.
    resumed = Learner(build_tiny_qwen2(build_char_tokenizer(), WIDE, 0), AlgorithmConfig(), TrainerConfig(lr=1e-3),
                      ModelConfig(), device="cpu", max_len=MAX_LEN)
    resumed.load_optimizer(tmp_path / "optimizer")
    loaded = sum(v.numel() * v.element_size() for s in resumed.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    assert loaded == full_bytes
