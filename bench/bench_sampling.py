"""Per-row-temperature token sampling: naive torch vs ours (torch, triton, csrc), side by side.

Contenders, all on the same logits [B, V] with a per-row temperature in [0.6, 1.4]:

- ``naive``: what trainers do today: logits / T, then (when filtering) a full descending sort, top-k/top-p
  masks on the sorted cumulative softmax, scatter back, softmax, `torch.multinomial`.
- ``ours-torch``: ``backend="torch"``: `torch.topk` selection (no full sort) + Gumbel-max.
- ``ours-triton``: ``backend="triton"`` (CUDA only; bisection selection + one-pass Gumbel-max kernel).
- ``csrc``: ``backend="csrc"``: the C++ op (CPU: vectorised single pass, heap / histogram selection, threads
  over rows and vocabulary chunks; CUDA: one block per row).

Shapes: B in {1, 64, 256} x V = 151936 (Qwen2.5 vocabulary), fp32 on CPU and bf16 on GPU, without filters
and with top_k = 50, top_p = 0.9. Logits ~ N(0, 3^2): flatter than a trained LM's next-token distribution,
so top-p alone would keep thousands of tokens (a harder case for selection than real use).

Reported: median wall time, process CPU time per call (on a shared CPU machine wall time is inflated by other
jobs), GB/s of logits read once (B * V * element size / time) and, on GPU, that as a fraction of the measured
device copy bandwidth. On CPU the first build time of the C++ extension (fresh cache, in a subprocess) is
recorded too.

Run: ``python -m bench.bench_sampling`` (add ``--quick`` for B = 1, 64 only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `bench` and `erpo_fast` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import print_table, time_fn, write_results  # noqa: E402
from erpo_fast.kernels.sampling import sample_tokens  # noqa: E402

VOCAB = 151936
FILTERS = {"none": dict(), "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9)}


def naive_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None = None,
                 top_p: float | None = None) -> torch.Tensor:
    """The usual HF-style sampler: sort-based top-k/top-p masks, softmax, multinomial."""
    s = logits.float() / temperature[:, None]
    if top_k or top_p:
        sorted_s, order = torch.sort(s, dim=1, descending=True)
        remove = torch.zeros_like(sorted_s, dtype=torch.bool)
        if top_k:
            remove[:, top_k:] = True
        if top_p:
            probs = torch.softmax(sorted_s.masked_fill(remove, -torch.inf), dim=1)
            remove |= (torch.cumsum(probs, dim=1) - probs) >= top_p
        s = s.scatter(1, order, sorted_s.masked_fill(remove, -torch.inf))
    return torch.multinomial(torch.softmax(s, dim=1), 1).squeeze(1)


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    t = time_fn(lambda: x.clone(), warmup=2, iters=5, device=device)["min_s"]
    return 2 * x.numel() * 4 / t


def first_build_seconds() -> float | None:
    """Wall time of a fresh build + load of the C++ extension, in a subprocess with an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, ERPO_FAST_CACHE=cache)
        t0 = time.perf_counter()
        code = "from erpo_fast.csrc import load_ops; load_ops()"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:])
            return None
        return time.perf_counter() - t0


def make_call(name: str, logits: torch.Tensor, temperature: torch.Tensor, filt: dict):
    if name == "naive":
        return lambda: naive_sample(logits, temperature, **filt)
    backend = name.removeprefix("ours-")
    return lambda: sample_tokens(logits, temperature, seed=0, backend=backend, **filt)


def cpu_time_per_call(fn, iters: int = 2) -> float:
    t0 = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 1, 64 only")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = [1, 64] if args.quick else [1, 64, 256]
    contenders = ["naive", "ours-torch"] + (["ours-triton"] if cuda else []) + ["csrc"]
    from erpo_fast.csrc import ops_available

    if not ops_available():
        contenders.remove("csrc")
    bandwidth = copy_bandwidth(device) if cuda else None
    build_s = None if cuda else first_build_seconds()
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        logits = (torch.randn(B, VOCAB, generator=g) * 3.0).to(device=device, dtype=dtype)
        temperature = (torch.rand(B, generator=g) * 0.8 + 0.6).to(device)
        nbytes = logits.numel() * logits.element_size()
        for fname, filt in FILTERS.items():
            baseline = None
            for name in contenders:
                fn = make_call(name, logits, temperature, filt)
                timing = time_fn(fn, warmup=1, iters=3, device=device)
                t = timing["median_s"]
                baseline = baseline or t
                row = dict(B=B, V=VOCAB, dtype=str(dtype).removeprefix("torch."), filters=fname,
                           contender=name, median_ms=t * 1e3, min_ms=timing["min_s"] * 1e3,
                           gbps_logits=nbytes / t / 1e9, speedup_vs_naive=baseline / t)
                if cuda:
                    row["frac_copy_bw"] = nbytes / t / bandwidth
                else:
                    row["cpu_ms_per_call"] = cpu_time_per_call(fn) * 1e3
                rows.append(row)
                print(f"B={B} {fname} {name}: {t * 1e3:.2f} ms", flush=True)
    columns = ["B", "filters", "contender", "median_ms", "min_ms", "gbps_logits", "speedup_vs_naive"]
    columns += ["frac_copy_bw"] if cuda else ["cpu_ms_per_call"]
    print_table(rows, columns, title=f"sample_tokens, V={VOCAB}, {dtype}, threads={torch.get_num_threads()}")
    if build_s is not None:
        print(f"\ncsrc first build (fresh cache): {build_s:.1f} s")
    write_results("sampling", {
        "shapes": {"B": batches, "V": VOCAB, "dtype": str(dtype)},
        "threads": torch.get_num_threads(),
        "logits_distribution": "N(0, 3^2), temperature U[0.6, 1.4] per row",
        "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
        "csrc_first_build_s": build_s,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
