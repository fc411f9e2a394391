"""The learner's work evened out over two ranks (trainer.balance_ranks), at a size where its time follows tokens.

Two gloo processes (FSDP2, one thread each, one core each on a 2-core machine), each holding one Learner per arm
(balancing on, balancing off) on model B's shape from bench_vs_trl.py (random weights from the config). Every step
hands each rank ``--groups`` groups of ``--n`` samples: prompts of 15 tokens, responses of 8-64 tokens, and each
group is uniform (advantage 0, left out by ``trainer.skip_zero_advantage``) with probability ``--uniform`` (0.64:
the share of sequences the default job's learner left out over its 600 steps). Both arms get the same draws, and
they alternate step by step (the order swapped every step). Per step: ``train_on``'s wall time on rank 0 (the
step ends with a collective, so together on both), ``rank_imbalance`` (the busiest rank's packed tokens over the
mean), and the sequences that ran. Writes ``bench/results/rank_balance_B_uniform<100 p>-cpu.json``.

    python bench/bench_rank_balance.py --steps 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_vs_trl import MODELS  # noqa: E402
from bench.common import device_name, git_commit, print_table, write_results  # noqa: E402
from erpo_fast.batch import RolloutSequence  # noqa: E402
from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig  # noqa: E402
from erpo_fast.learner import Learner  # noqa: E402

WORLD = 2
PROMPT_TOKENS = 15
RESPONSE_TOKENS = (8, 64)
ARMS = {"balanced": True, "unbalanced": False}


def build_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = {k: v for k, v in MODELS["B"].items() if k != "new_tokens"}
    config = Qwen2Config(**spec, tie_word_embeddings=True, max_position_embeddings=2048, pad_token_id=0,
                         eos_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def step_batch(step: int, rank: int, args) -> list[RolloutSequence]:
    """This rank's groups at ``step``: the same for both arms."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    vocab = MODELS["B"]["vocab_size"]
    out = []
    for group in range(args.groups):
        prompt = torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist()
        uniform = float(torch.rand(1, generator=g)) < args.uniform
        advantages = torch.zeros(args.n) if uniform else torch.randn(args.n, generator=g)
        for j in range(args.n):
            r = int(torch.randint(RESPONSE_TOKENS[0], RESPONSE_TOKENS[1] + 1, (1,), generator=g))
            out.append(RolloutSequence(
                prompt_ids=prompt, response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                rollout_logprobs=(-3.0 + 0.3 * torch.randn(r, generator=g)).tolist(), temperature=1.0,
                advantage=float(advantages[j]), seq_key=group * args.n + j))
    return out


def _worker(rank: int, store: str, args, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        learners = {arm: Learner(build_model(), AlgorithmConfig(),
                                 TrainerConfig(lr=1e-6, micro_batch_size=32, balance_ranks=balance),
                                 ModelConfig(), device="cpu", max_len=RESPONSE_TOKENS[1])
                    for arm, balance in ARMS.items()}
        rows = []
        for step in range(args.warmup + args.steps):
            batch = step_batch(step, rank, args)
            order = list(ARMS) if step % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                dist.barrier()
                t0 = time.perf_counter()
                metrics = learners[arm].train_on(batch)
                seconds = time.perf_counter() - t0
                if step >= args.warmup:
                    rows.append({"arm": arm, "step": step, "seconds": seconds,
                                 "rank_imbalance": metrics.get("rank_imbalance", float("nan")),
                                 "sequences_run": metrics["num_sequences"] - metrics["zero_adv_skipped"]})
        if rank == 0:
            torch.save(rows, out_path)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--groups", type=int, default=8, help="groups per rank per step")
    ap.add_argument("--n", type=int, default=8, help="samples per group")
    ap.add_argument("--uniform", type=float, default=0.64, help="probability that a group is uniform")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="erpo-bench-balance-") as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), args, out), nprocs=WORLD, join=True,
                           start_method="spawn")
        rows = torch.load(out, weights_only=False)
    by_step = {(r["arm"], r["step"]): r for r in rows}
    steps = sorted({r["step"] for r in rows})
    table = []
    for arm in ARMS:
        mine = [by_step[(arm, s)] for s in steps]
        table.append({"arm": arm, "steps": len(mine),
                      "step_s_median": statistics.median(r["seconds"] for r in mine),
                      "step_s_total": sum(r["seconds"] for r in mine),
                      "rank_imbalance_mean": statistics.fmean(r["rank_imbalance"] for r in mine),
                      "sequences_run_mean": statistics.fmean(r["sequences_run"] for r in mine)})
    ratio = [by_step[("unbalanced", s)]["seconds"] / by_step[("balanced", s)]["seconds"] for s in steps]
    table[0]["speedup_vs_unbalanced_median"] = statistics.median(ratio)
    table[1]["speedup_vs_unbalanced_median"] = 1.0
    print_table(table, list(table[0]), title=f"learner step, 2 ranks, model B, {args.groups} groups x {args.n} "
                                             f"per rank, p(uniform)={args.uniform}")
    write_results(f"rank_balance_B_uniform{round(100 * args.uniform)}", {
        "model": "B", "model_shape": MODELS["B"], "world": WORLD, "threads_per_rank": 1,
        "groups_per_rank": args.groups, "n": args.n, "uniform": args.uniform, "prompt_tokens": PROMPT_TOKENS,
        "response_tokens": list(RESPONSE_TOKENS), "micro_batch_size": 32, "steps": args.steps,
        "warmup": args.warmup, "commit": git_commit(), "device": device_name("cpu"), "summary": table,
        "per_step_speedup": ratio, "rows": rows})


if __name__ == "__main__":
    main()
