"""Packed attention of GRPO groups: each sample recomputing its shared prompt vs the prompt's attention once.

One packed row as the learner builds it (``pack_sequences(share_prompts=True)``: each group's prompt once, then its
n responses), random q/k/v of a model's attention shape, and the learner's own ``packed_sdpa_attention``
forward + backward with two layouts of the same row: ``per-sample`` (``share_prompt_attention=False``: each
sample's block holds its prompt again, as before) and ``shared`` (the prompt alone once, then the responses
against prompt + themselves in masked suffix blocks, where ``shares_prompt_attention`` says so; where it does not,
``suffix-forced`` times the suffix blocks anyway, the evidence for that rule). The contenders alternate in one
process on the same threads; median of ``--iters`` after a warm-up. ``naive`` (``--naive``) is a plain-torch
reference: each sample's full sequence through ``F.scaled_dot_product_attention(is_causal=True)`` with its prompt
copied (no packing).

``--learner``: the learner's own ``loss_and_grads`` at the model's shape (random weights) with the two layouts,
alternated per round (results: ``bench/results/packed_attention_learner_<models><tag>-cpu.json``).

Run: ``python -m bench.bench_packed_attention [--models C D] [--prompts 15 60 130 200] [--responses 64 256 512]
[--dtypes float32 bfloat16] [--tag _x]`` (results: ``bench/results/packed_attention_<models><tag>-cpu.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_vs_trl import MODELS, random_model  # noqa: E402
from bench.common import print_table, write_results  # noqa: E402
from erpo_fast import packed_attention  # noqa: E402
from erpo_fast.packed_attention import PackedLayout, packed_sdpa_attention, shares_prompt_attention  # noqa: E402


def group_row(groups: int, n: int, prompt: int, response: int) -> tuple[list, int]:
    """Segments of ``groups`` groups of ``n`` samples packed with their prompt once, and the row length."""
    segments, offset = [], 0
    for _ in range(groups):
        a0, offset = offset, offset + prompt
        for _ in range(n):
            segments.append((a0, prompt, offset, response))
            offset += response
    return segments, offset


def run_case(model: str, dtype: torch.dtype, groups: int, n: int, prompt: int, response: int, iters: int,
             naive: bool) -> dict:
    spec = MODELS[model]
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    dim = spec["hidden_size"] // heads
    segments, total = group_row(groups, n, prompt, response)
    layouts = {"per-sample": PackedLayout.from_segments(segments, total, share_prompt_attention=False),
               "shared": PackedLayout.from_segments(segments, total, share_prompt_attention=True)}
    if not shares_prompt_attention(prompt, response, n):  # the rule's other side: suffix blocks anyway
        limit, packed_attention._SUFFIX_MAX_RESPONSE = packed_attention._SUFFIX_MAX_RESPONSE, response
        try:
            layouts["suffix-forced"] = PackedLayout.from_segments(segments, total, share_prompt_attention=True)
        finally:
            packed_attention._SUFFIX_MAX_RESPONSE = limit
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, total, dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, kv_heads, total, dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, kv_heads, total, dim, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(1, total, heads, dim, generator=g).to(dtype)

    def packed(layout):
        out, _ = packed_sdpa_attention(None, q, k, v, None, scaling=dim ** -0.5, packed_layout=layout)
        out.backward(grad)

    def naive_attention():  # every sample's full sequence, its prompt copied
        def seq(t):
            return torch.stack([torch.cat([t[0, :, a0: a0 + al], t[0, :, b0: b0 + bl]], dim=1)
                                for a0, al, b0, bl in segments])

        out = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), is_causal=True, scale=dim ** -0.5,
                                             enable_gqa=heads != kv_heads)
        out.float().sum().backward()

    contenders = {name: (lambda layout=layout: packed(layout)) for name, layout in layouts.items()}
    if naive:
        contenders["naive"] = naive_attention
    times = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for i in range(iters):
        for name in (list(contenders) if i % 2 == 0 else list(contenders)[::-1]):
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"model": model, "dtype": str(dtype).removeprefix("torch."), "groups": groups, "n": n,
            "prompt": prompt, "response": response, "row_tokens": total,
            "suffix_rule": shares_prompt_attention(prompt, response, n),
            **{f"{name}_ms": 1e3 * t for name, t in med.items()},
            "shared_over_per_sample": med["shared"] / med["per-sample"],
            "forced_over_per_sample": med["suffix-forced"] / med["per-sample"] if "suffix-forced" in med else None,
            "times_s": times}


def learner_case(model: str, dtype: str, prompts: tuple[int, int], response: int, rounds: int) -> dict:
    """One learner step's forward + backward (``Learner.loss_and_grads``: 4 prompts x 8 samples, micro-batches of
    8 sequences, as bench_vs_trl runs it) at ``model``'s shape with random weights, the layout's prompt sharing on
    and off, alternated per round on fresh batches (prompt lengths drawn from ``prompts``)."""
    import random

    from erpo_fast.batch import PackedBatch, RolloutSequence
    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.learner import Learner

    learner = Learner(random_model(model), AlgorithmConfig(), TrainerConfig(micro_batch_size=8),
                      ModelConfig(dtype=dtype), device="cpu", max_len=2048)

    def batch(seed):
        rng = random.Random(seed)
        out = []
        for g in range(4):
            prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(*prompts))]
            out += [RolloutSequence(prompt, [rng.randrange(3, 1000) for _ in range(response)], [], 1.0,
                                    rng.gauss(0, 1), g * 8 + j) for j in range(8)]
        return out

    def layout_sharing(share):
        def layout(self):
            if self._layout is None:
                self._layout = PackedLayout.from_segments(self.segments, int(self.input_ids.shape[1]),
                                                          self.input_ids.device, share_prompt_attention=share)
            return self._layout
        return layout

    default_layout = PackedBatch.layout
    times = {"per-sample": [], "shared": []}
    try:
        learner.loss_and_grads(batch(-1))  # warm-up
        for r in range(rounds):
            for name in (["shared", "per-sample"] if r % 2 == 0 else ["per-sample", "shared"]):
                PackedBatch.layout = layout_sharing(name == "shared")
                t0 = time.perf_counter()
                learner.loss_and_grads(batch(r))
                times[name].append(time.perf_counter() - t0)
    finally:
        PackedBatch.layout = default_layout
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"model": model, "dtype": dtype, "prompt": f"{prompts[0]}-{prompts[1]}", "response": response,
            "per-sample_s": med["per-sample"], "shared_s": med["shared"],
            "shared_over_per_sample": med["shared"] / med["per-sample"], "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["C", "D"], choices=list(MODELS))
    parser.add_argument("--prompts", nargs="+", type=int, default=[15, 60, 130, 200])
    parser.add_argument("--responses", nargs="+", type=int, default=[64, 256, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--groups", type=int, default=1, help="prompts in the packed row")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--naive", action="store_true", help="also time the unpacked plain-torch reference")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--learner", action="store_true",
                        help="time Learner.loss_and_grads instead (prompts 60-200 and fixed 15, 64-token responses)")
    parser.add_argument("--rounds", type=int, default=3, help="--learner: alternations of the two layouts")
    args = parser.parse_args()
    if args.learner:
        torch.set_num_threads(args.threads)
        rows = [learner_case(m, d, p, 64, args.rounds) for m in args.models for d in args.dtypes
                for p in ((60, 200), (15, 15))]
        print_table(rows, ["model", "dtype", "prompt", "response", "per-sample_s", "shared_s",
                           "shared_over_per_sample"],
                    title=f"Learner.loss_and_grads, 4 prompts x 8, micro-batch 8, {args.threads} thread(s)")
        write_results("packed_attention_learner_" + "".join(args.models) + args.tag, {
            "threads": args.threads, "rounds": args.rounds, "models": {m: MODELS[m] for m in args.models},
            "rows": rows, "notes": f"shared 2-core machine; load average {os.getloadavg()} at end"})
        return
    if min(args.prompts + args.responses) < 1 or min(args.groups, args.n, args.iters, args.threads) < 1:
        parser.exit(2, "bench_packed_attention: lengths, --groups, --n, --iters and --threads must be >= 1\n")
    torch.set_num_threads(args.threads)
    rows = [run_case(m, getattr(torch, d), args.groups, args.n, p, r, args.iters, args.naive)
            for m in args.models for d in args.dtypes for r in args.responses for p in args.prompts]
    columns = ["model", "dtype", "prompt", "response", "per-sample_ms", "shared_ms"] + (
        ["naive_ms"] if args.naive else []) + ["shared_over_per_sample", "suffix_rule", "forced_over_per_sample"]
    print_table(rows, columns, title=f"packed attention forward + backward, {args.groups} group(s) x {args.n}, "
                                     f"{args.threads} thread(s); suffix_rule: whether the layout uses suffix blocks; "
                                     f"forced: suffix blocks where the rule says no")
    write_results("packed_attention_" + "".join(args.models) + args.tag, {
        "threads": args.threads, "iters": args.iters, "groups": args.groups, "n": args.n,
        "models": {m: MODELS[m] for m in args.models}, "rows": rows,
        "notes": f"shared 2-core machine; load average {os.getloadavg()} at end"})


if __name__ == "__main__":
    main()
