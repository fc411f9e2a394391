"""The memory plan against the measured peak RSS, the one-weight-copy saving, and the learner's FLOP/s (CPU).

For each model (``C`` = SmolLM2-135M's shape, ``D`` = Qwen2.5-0.5B's; random weights, see bench_vs_trl.py) and
each token budget, one subprocess runs erpo-fast's real training steps (the bench_vs_trl worker: GSM8K-like
prompts of 60-200 tokens, full-length responses) and reports its peak RSS (``ru_maxrss``, the process's own) next
to the plan the session printed at start-up (runtime = the RSS measured before the model loaded). At the largest
model it also runs with ``rollout.share_weights false`` (the engine's own copy) to measure what one copy saves.

Achieved FLOP/s: the learner's model FLOPs (``bench_vs_trl.learner_flops``: 6 x decoder parameters x packed
tokens + 6 x V x H x trained tokens + causal attention) over the time of ``Learner.train_on`` (forward, backward,
clipping and the AdamW step), against a plain fp32 matmul of the model's MLP size ([tokens, H] x [H, I]) timed
in the same subprocess on the same threads.

Run: ``python -m bench.bench_memory [--models C D] [--budgets 512 1024] [--steps 2] [--tag T]`` (results:
``bench/results/memory_plan_<models>[_<dtypes>][_<tag>]-cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_vs_trl import GROUP, MODELS, build_assets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matmul_flops(hidden: int, intermediate: int, tokens: int, threads: int, iters: int = 20) -> dict:
    """FLOP/s of a plain fp32 [tokens, H] x [H, I] matmul on ``threads`` threads: median and best of ``iters``
    (on a shared machine the best is the closer estimate of what the core can do)."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, intermediate)
    a @ b
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flops = 2 * tokens * hidden * intermediate
    return {"median": flops / statistics.median(times), "best": flops / min(times)}


def worker(assets: dict, steps: int, warmup: int) -> None:
    from bench.bench_vs_trl import run_ours

    spec = MODELS[assets["model"]]
    shape = (spec["hidden_size"], spec["intermediate_size"], 1024, assets.get("threads", 1))
    before = matmul_flops(*shape)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        result = run_ours(assets, steps, warmup, Path(tmp))
    after = matmul_flops(*shape)
    # The reference: the best matmul rate seen before or after the run (the learner's own rate is a median-free
    # single measurement of its last step, so this errs against the learner).
    result["matmul_flops_per_s"] = max(before["best"], after["best"])
    result["matmul_detail"] = {"before": before, "after": after}
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(assets: dict, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_memory", "--worker", "--assets", json.dumps(assets),
           "--steps", str(steps), "--warmup", str(warmup)]
    threads = str(assets.get("threads", 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench_memory: a worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["C", "D"], choices=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[512, 1024], help="trainer.micro_batch_tokens")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="steps per subprocess (the peak needs AdamW's state, "
                                                             "which exists from the end of step 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-copy-run", action="store_true", help="skip the rollout.share_weights=false run")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="model.dtype runs (bfloat16 on CPU: autocast learner, bf16 engine copy)")
    parser.add_argument("--tag", default="", help="suffix of the results file name (keeps an earlier run's file)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.assets), args.steps, args.warmup)
        return
    if args.steps < 1 or args.prompts_per_step < 1 or args.threads < 1:
        parser.exit(2, "bench_memory: --steps, --prompts-per-step and --threads must be >= 1\n")
    from bench.common import print_table, write_results

    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for name in args.models:
            assets = build_assets(name, Path(tmp), "gsm60-200", new_tokens=args.new_tokens)
            runs = [(b, True, dtype) for dtype in args.dtypes for b in args.budgets]
            if not args.no_copy_run and name == args.models[-1]:
                runs.append((args.budgets[-1], False, args.dtypes[0]))
            for budget, share, dtype in runs:
                a = dict(assets, threads=args.threads, overrides={
                    "trainer.micro_batch_tokens": budget, "rollout.share_weights": share, "model.dtype": dtype,
                    "trainer.prompts_per_step": args.prompts_per_step, "trainer.micro_batch_size": 1024,
                    "trainer.cpu_heap": "release"})  # the resident peak the plan predicts (erpo_fast/cpu_heap.py)
                res = run_worker(a, args.steps, 0)
                steps = res["steps"]
                last = steps[-1]
                flops = last["learner_flops"]
                achieved = flops["total"] / last["train_on_s"]
                row = {"model": name, "dtype": dtype, "micro_batch_tokens": budget, "share_weights": share,
                       "plan_micro_batch_tokens": res["plan_micro_batch_tokens"],
                       "peak_rss_gb": res["peak_rss_bytes"] / 1e9, "plan_peak_gb": res["plan_peak_bytes"] / 1e9,
                       "plan_over_measured": res["plan_peak_bytes"] / res["peak_rss_bytes"],
                       "step_s": [s["step_s"] for s in steps], "train_on_s": [s["train_on_s"] for s in steps],
                       "generation_s": [s["generation_s"] for s in steps],
                       "packed_tokens": flops["packed_tokens"], "trained_tokens": flops["trained_tokens"],
                       "learner_gflops": achieved / 1e9, "matmul_gflops": res["matmul_flops_per_s"] / 1e9,
                       "flops_fraction": achieved / res["matmul_flops_per_s"],
                       "matmul_detail_gflops": {k: {q: v / 1e9 for q, v in d.items()}
                                                for k, d in res.get("matmul_detail", {}).items()},
                       "mismatch": [{k: v for k, v in st.items() if k.startswith("mismatch_")} for st in steps],
                       "plan_terms_gb": {k: v / 1e9 for k, v in res["plan_terms"].items()},
                       "plan_phases_gb": {k: v / 1e9 for k, v in res["plan_phases"].items()}}
                rows.append(row)
                print(f"model {name} {dtype} budget {budget} share {share}: peak RSS {row['peak_rss_gb']:.2f} GB, plan "
                      f"{row['plan_peak_gb']:.2f} GB ({row['plan_over_measured']:.3f}x), learner "
                      f"{row['learner_gflops']:.1f} GFLOP/s = {row['flops_fraction']:.2f} of matmul "
                      f"{row['matmul_gflops']:.1f}", flush=True)
    print_table(rows, ["model", "dtype", "micro_batch_tokens", "share_weights", "peak_rss_gb", "plan_peak_gb",
                       "plan_over_measured", "learner_gflops", "matmul_gflops", "flops_fraction"],
                title="memory plan vs measured peak RSS; learner FLOP/s vs a same-run fp32 matmul")
    tag = ("" if args.dtypes == ["float32"] else "_" + "_".join(args.dtypes)) + (f"_{args.tag}" if args.tag else "")
    write_results("memory_plan_" + "".join(args.models) + tag, {
        "threads": args.threads, "steps_per_run": args.steps,
        "settings": {"prompts_per_step": args.prompts_per_step, "group": GROUP, "new_tokens": args.new_tokens,
                     "prompt_tokens": "60-200 (uniform, one letter = one token)",
                     "full_length": "no stop tokens", "checkpointing": False, "dtypes": args.dtypes},
        "models": {name: MODELS[name] for name in args.models}, "rows": rows,
        "notes": f"shared 2-core machine; load average {load_start} at start, {os.getloadavg()} at end; each run in "
                 "its own subprocess (peak RSS is its own)"})


if __name__ == "__main__":
    main()
