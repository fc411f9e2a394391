"""The CPU decode's matmuls: F.linear against oneDNN on the plain weight and on a packed copy (engines/onednn_weights).

At the linears of model C (SmolLM2-135M's shape) and D (Qwen2.5-0.5B's): q/k/v fused, o, gate/up fused, down and the
LM head, for 1-256 rows (decode: one row per live sample; prefill: prompt tokens), fp32 and bf16, one thread by
default. Contenders, alternated call by call in each timed round:

- ``f_linear``: ``torch.nn.functional.linear`` (fp32: MKL's sgemm; bf16: oneDNN through torch's matmul);
- ``onednn_plain``: ``torch.ops.mkldnn._linear_pointwise`` on the weight as it is;
- ``onednn_packed``: the same op on the weight reordered by ``_reorder_linear_weight`` (what the engine runs),
  whose reorder time per weight is reported too (the engine pays it once per generate call).

Run: ``python -m bench.bench_onednn_weights [--models C D] [--dtypes float32 bfloat16] [--rows 1 8 32 64 256]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import print_table, write_results  # noqa: E402
from erpo_fast.engines.onednn_weights import onednn_available, pack, packed_linear  # noqa: E402

# (hidden, q width, kv width, intermediate, vocab) of the real shapes in bench_vs_trl / bench_rollout
SHAPES = {"C": (576, 576, 192, 1536, 49152), "D": (896, 896, 128, 4864, 151936)}


def linears(model: str) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of the engine's matmuls at a model's shape."""
    h, q, kv, inter, vocab = SHAPES[model]
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter), "lm_head": (vocab, h)}


def contenders(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor) -> dict:
    return {"f_linear": lambda: F.linear(x, weight), "onednn_plain": lambda: packed_linear(x, weight, None),
            "onednn_packed": lambda: packed_linear(x, packed, None)}


def time_alternated(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean seconds per call, the contenders alternated within each round."""
    for fn in fns.values():
        fn()
    per_call = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(times) for name, times in per_call.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["C", "D"], choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flops-per-round", type=float, default=2e9, help="sets the calls per round of each shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        if not onednn_available(dtype):
            print(f"skipping {dtype_name}: no oneDNN linear for it in this torch build")
            continue
        for model in args.models:
            for name, (out_features, in_features) in linears(model).items():
                g = torch.Generator().manual_seed(0)
                weight = torch.randn(out_features, in_features, generator=g).to(dtype)
                start = time.perf_counter()
                packed = pack(weight)
                pack_s = time.perf_counter() - start
                for rows in args.rows:
                    x = torch.randn(rows, in_features, generator=g).to(dtype)
                    flops = 2 * rows * in_features * out_features
                    calls = max(1, int(args.flops_per_round / flops))
                    seconds = time_alternated(contenders(x, weight, packed), calls, args.rounds)
                    row = {"dtype": dtype_name, "model": model, "linear": name, "rows": rows,
                           "out": out_features, "in": in_features, "pack_ms": pack_s * 1e3,
                           **{f"{k}_gflops": flops / s / 1e9 for k, s in seconds.items()},
                           "packed_speedup": seconds["f_linear"] / seconds["onednn_packed"]}
                    rows_out.append(row)
            print_table([r for r in rows_out if r["dtype"] == dtype_name and r["model"] == model],
                        ["linear", "rows", "out", "in", "f_linear_gflops", "onednn_plain_gflops",
                         "onednn_packed_gflops", "packed_speedup", "pack_ms"],
                        title=f"model {model}, {dtype_name}, threads={args.threads} (GFLOP/s, median of "
                              f"{args.rounds} alternated rounds)")
    write_results("onednn_weights_" + "".join(args.models), {
        "threads": args.threads, "rounds": args.rounds, "dtypes": args.dtypes, "row_counts": args.rows,
        "shapes": {m: dict(zip(("hidden", "q_width", "kv_width", "intermediate", "vocab"), SHAPES[m]))
                   for m in args.models},
        "rows": rows_out,
    })


if __name__ == "__main__":
    main()
