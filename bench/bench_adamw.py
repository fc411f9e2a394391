"""One AdamW step at real model sizes: torch's fused kernel vs foreach vs the per-parameter loop (CPU).

The parameters are those of model C or D (bench_vs_trl.py's shapes, random weights, fp32) with random gradients;
each implementation gets a fresh optimizer (its state is built by one untimed step), then ``--iters`` timed steps.
Implementations alternate (fused, foreach, loop, then reversed) in one process on the same threads; the peak RSS
rise of each first step (state allocation plus temporaries) is read from /proc (see bench/common.py).

Run: ``python -m bench.bench_adamw [--models C D] [--iters 3] [--threads 1]`` (results:
``bench/results/adamw_<models>-cpu.json``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_vs_trl import MODELS  # noqa: E402
from bench.common import peak_memory, print_table, write_results  # noqa: E402
from erpo_fast.learner import adamw_impl_kwargs  # noqa: E402

IMPLS = ("fused", "foreach", "loop")


def build_params(name: str) -> list[torch.nn.Parameter]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = {k: v for k, v in MODELS[name].items() if k not in ("new_tokens", "arch")}
    llama = MODELS[name].get("arch") == "llama"
    config = (LlamaConfig if llama else Qwen2Config)(**spec, tie_word_embeddings=True)
    model = (LlamaForCausalLM if llama else Qwen2ForCausalLM)(config)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["C", "D"], choices=list(MODELS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.iters < 1 or args.threads < 1:
        parser.exit(2, "bench_adamw: --iters and --threads must be >= 1\n")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        params = build_params(name)
        count = sum(p.numel() for p in params)
        times = {impl: [] for impl in IMPLS}
        extra = {}
        for order in (IMPLS, IMPLS[::-1]):
            for impl in order:
                opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0,
                                        **adamw_impl_kwargs(impl, torch.device("cpu"), False))
                extra[impl] = max(extra.get(impl, 0), peak_memory(opt.step))  # state + temporaries
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    opt.step()
                    times[impl].append(time.perf_counter() - t0)
                del opt
                gc.collect()
        for impl in IMPLS:
            rows.append({"model": name, "params_m": count / 1e6, "impl": impl,
                         "step_s": statistics.median(times[impl]), "min_s": min(times[impl]),
                         "first_step_extra_gb": extra[impl] / 1e9, "state_gb": 8 * count / 1e9,
                         "speedup_vs_loop": None, "times": times[impl]})
        loop = next(r["step_s"] for r in rows if r["model"] == name and r["impl"] == "loop")
        for r in rows:
            if r["model"] == name:
                r["speedup_vs_loop"] = loop / r["step_s"]
        del params
        gc.collect()
    print_table(rows, ["model", "params_m", "impl", "step_s", "min_s", "speedup_vs_loop", "first_step_extra_gb",
                       "state_gb"], title=f"AdamW step, fp32, {args.threads} thread(s)")
    write_results("adamw_" + "".join(args.models), {
        "threads": args.threads, "iters_per_impl_per_pass": args.iters, "passes": 2,
        "models": {n: MODELS[n] for n in args.models}, "rows": rows,
        "notes": f"shared 2-core machine; load average {os.getloadavg()} at end"})


if __name__ == "__main__":
    main()
