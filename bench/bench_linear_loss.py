"""Fused linear GRPO loss, forward + backward: naive full logits vs ours (torch, triton) vs Liger, side by side.

Contenders, all on the same inputs (a packed batch of N tokens, LM head [V, H], token_mean loss with old and
reference log-probs, beta = 0.04, k3 KL):

- ``naive``: ``backend="reference"``: full ``[N, V]`` logits, log_softmax, gather, `policy_loss`, autograd.
- ``ours-torch``: ``backend="torch"``: row chunks, three matmuls, gradients computed in the forward pass.
- ``ours-triton``: ``backend="triton"`` (CUDA only).
- ``liger``: ``LigerFusedLinearGRPOLoss(loss_type="dapo")`` with the same loss terms. Liger takes one scalar
  temperature; ours get a per-row tensor holding that same value, so all four compute the same loss (checked
  in the ``loss_rel_diff_vs_naive`` column). On CPU Liger runs with
  ``compiled=False`` (its torch.compile of the loss math needs a working inductor toolchain and only speeds up
  N-sized elementwise work).

Reported per contender: median wall time of forward + backward, process CPU time per call (not inflated by
other jobs on a shared machine when threads = 1), extra peak memory (CUDA allocator peak, or on CPU the RSS
high-water mark, see bench.common.peak_memory), and TFLOPS counted as 6 N H V (three matmuls of 2 N H V).

Run: ``python -m bench.bench_linear_loss`` (CPU default: N=2048, H=896, V=151936 fp32 plus a smaller shape) or
``--gpu`` for the Qwen2.5 0.5B/1.5B/7B heads (H = 896/1536/3584, V = 151936) at N = 4k..32k in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `bench` and `erpo_fast` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import peak_memory, print_table, time_fn, write_results  # noqa: E402
from erpo_fast.kernels.fused_linear import chunked, linear_grpo_loss, linear_logprobs  # noqa: E402

VOCAB = 151936
CPU_SHAPES = [(2048, 896, VOCAB), (512, 896, VOCAB)]
GPU_SHAPES = [(n, h, VOCAB) for h in (896, 1536, 3584) for n in (4096, 8192, 16384, 32768)]
CPU_GOAL_SHAPE = (2048, 896, VOCAB)
BETA, EPS_LOW, EPS_HIGH, TEMPERATURE = 0.04, 0.2, 0.28, 0.9


def make_problem(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g)).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    # One value in a per-row tensor: ours still take the per-row path (the value is runtime data), and Liger,
    # which takes one scalar, computes the same loss, so the loss column cross-checks all contenders.
    temperature = torch.full((n,), TEMPERATURE, device=device)
    with torch.no_grad():
        lp = linear_logprobs(hidden, weight, labels, temperature)
    num_seqs = 8
    seq_len = n // num_seqs
    adv_seq = torch.randn(num_seqs, generator=g).to(device)
    return dict(
        hidden=hidden.requires_grad_(True), weight=weight.requires_grad_(True), labels=labels,
        temperature=temperature, scalar_temperature=TEMPERATURE, num_seqs=num_seqs, seq_len=seq_len,
        advantages_seq=adv_seq, advantages=adv_seq.repeat_interleave(seq_len),
        mask=torch.ones(n, dtype=torch.bool, device=device),
        old=(lp + 0.1 * torch.randn(n, generator=g).to(device)).float(),
        ref=(lp + 0.1 * torch.randn(n, generator=g).to(device)).float(),
    )


def _drop_grads(p: dict) -> None:
    p["hidden"].grad = None
    p["weight"].grad = None


def ours(p: dict, backend: str, chunk_rows: int | None = None):
    """``chunk_rows``: the torch backend's row chunk forced to that many rows (``chunked.MAX_CHUNK_ROWS``)."""
    def step():
        if chunk_rows is None:
            return call()
        saved = chunked.MAX_CHUNK_ROWS, chunked.ROW_CHUNK_BYTES
        chunked.MAX_CHUNK_ROWS = chunk_rows
        chunked.ROW_CHUNK_BYTES = max(saved[1], chunk_rows * p["weight"].shape[0] * 4)
        try:
            return call()
        finally:
            chunked.MAX_CHUNK_ROWS, chunked.ROW_CHUNK_BYTES = saved

    def call():
        loss, _ = linear_grpo_loss(p["hidden"], p["weight"], p["labels"], p["temperature"], p["advantages"],
                                   p["mask"], old_logprobs=p["old"], ref_logprobs=p["ref"], kl_beta=BETA,
                                   kl_estimator="k3", eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg="token_mean",
                                   backend=backend)
        loss.backward()
        _drop_grads(p)  # so every call (and every contender) starts without gradient buffers
        return loss.detach()
    return step


def liger(p: dict, compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(beta=BETA, compiled=compiled, use_ref_model=True, epsilon_low=EPS_LOW,
                                      epsilon_high=EPS_HIGH, loss_type="dapo", temperature=p["scalar_temperature"])
    b, s = p["num_seqs"], p["seq_len"]
    ids = p["labels"].view(b, s)
    attn = p["mask"].view(b, s).float()
    old, ref = p["old"].view(b, s), p["ref"].view(b, s)

    def step():
        loss, _ = module(p["hidden"].view(b, s, -1), p["weight"], ids, attn, p["advantages_seq"],
                         ref_per_token_logps=ref, old_per_token_logps=old)
        loss.backward()
        _drop_grads(p)  # so every call (and every contender) starts without gradient buffers
        return loss.detach()
    return step


def measure(step, device: str, iters: int) -> dict:
    losses = []

    def recorded():
        losses.append(step())

    peak = peak_memory(recorded, device=device)  # first call, doubles as the warm-up
    cpu0 = time.process_time()
    timing = time_fn(recorded, warmup=0, iters=iters, device=device)
    cpu_per_call = (time.process_time() - cpu0) / iters
    return dict(peak_extra_bytes=peak, median_s=timing["median_s"], min_s=timing["min_s"],
                cpu_s_per_call=cpu_per_call, iters=iters, loss=float(losses[-1]))


def run_shape(n: int, h: int, v: int, dtype: torch.dtype, device: str, iters: int, skip: set[str],
              chunk_rows: list[int]) -> list[dict]:
    p = make_problem(n, h, v, dtype, device)
    contenders = {"naive": ours(p, "reference"), "ours-torch": ours(p, "torch")}
    contenders.update({f"ours-torch@{r}rows": ours(p, "torch", r) for r in chunk_rows})
    if device == "cuda":
        contenders["ours-triton"] = ours(p, "triton")
    try:
        contenders["liger"] = liger(p, compiled=device == "cuda")
    except ImportError:
        print("liger-kernel not installed: skipping the liger column")
    rows = []
    for name, step in contenders.items():
        if name in skip:
            continue
        result = measure(step, device, iters)  # its loss column cross-checks the contenders
        flops = 6.0 * n * h * v
        rows.append(dict(contender=name, N=n, H=h, V=v, dtype=str(dtype).replace("torch.", ""), **result,
                         peak_extra_gb=result["peak_extra_bytes"] / 2**30, tflops=flops / result["median_s"] / 1e12))
        print(f"  {name:12s} {result['median_s']:8.3f} s  cpu {result['cpu_s_per_call']:8.2f} s  "
              f"peak {result['peak_extra_bytes'] / 2**30:6.3f} GiB", flush=True)
    base = next((r for r in rows if r["contender"] == "naive"), None)
    for r in rows:
        if base is not None:
            r["time_vs_naive"] = r["median_s"] / base["median_s"]
            r["cpu_time_vs_naive"] = r["cpu_s_per_call"] / base["cpu_s_per_call"]
            r["memory_vs_naive"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
            r["loss_rel_diff_vs_naive"] = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
    del p
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU shape set (needs CUDA)")
    parser.add_argument("--quick", "--cpu", action="store_true", help="CPU shape set (the default without CUDA)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip", default="", help="comma-separated contenders to leave out")
    parser.add_argument("--shapes", default="", help="override the shape set, e.g. 512x896x151936,1024x896x32000")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--chunk-rows", type=int, nargs="*", default=[],
                        help="also time the torch backend with its row chunk forced to each of these row counts")
    parser.add_argument("--tag", default="", help="suffix of the results file name (keeps an earlier run's file)")
    args = parser.parse_args()
    if any(r < 1 for r in args.chunk_rows):
        parser.exit(2, "bench_linear_loss: --chunk-rows must be >= 1\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_gpu = args.gpu or (torch.cuda.is_available() and not args.quick)
    device = "cuda" if use_gpu else "cpu"
    shapes, dtype = (GPU_SHAPES, torch.bfloat16) if use_gpu else (CPU_SHAPES, torch.float32)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    iters = args.iters or (5 if use_gpu else 2)
    skip = {s for s in args.skip.split(",") if s}

    rows = []
    for n, h, v in shapes:
        print(f"N={n} H={h} V={v} {dtype}", flush=True)
        rows += run_shape(n, h, v, dtype, device, iters, skip, args.chunk_rows)
        if use_gpu:
            torch.cuda.empty_cache()

    columns = ["contender", "N", "H", "V", "median_s", "cpu_s_per_call", "peak_extra_gb", "tflops", "time_vs_naive",
               "cpu_time_vs_naive", "memory_vs_naive", "loss_rel_diff_vs_naive"]
    print_table(rows, columns, title=f"fused linear GRPO loss, forward + backward ({device})")

    payload = dict(device_type=device, dtype=str(dtype), threads=torch.get_num_threads(),
                   shapes=[list(s) for s in shapes], iters=iters, flops_per_step="6*N*H*V",
                   loss=dict(loss_agg="token_mean", kl_beta=BETA, kl_estimator="k3", eps_low=EPS_LOW,
                             eps_high=EPS_HIGH),
                   rows=rows)
    if not use_gpu:
        goal = {r["contender"]: r for r in rows if (r["N"], r["H"], r["V"]) == CPU_GOAL_SHAPE}
        if "ours-torch" in goal and "naive" in goal:
            ours_row = goal["ours-torch"]
            payload["cpu_goal"] = dict(
                shape=list(CPU_GOAL_SHAPE), memory_ratio=ours_row["memory_vs_naive"],
                time_ratio=ours_row["time_vs_naive"], cpu_time_ratio=ours_row["cpu_time_vs_naive"],
                memory_goal="<= 0.25", time_goal="<= 1.15",
                memory_met=ours_row["memory_vs_naive"] <= 0.25, time_met=ours_row["time_vs_naive"] <= 1.15)
            print(f"\nCPU goal at N,H,V={CPU_GOAL_SHAPE}: memory {ours_row['memory_vs_naive']:.3f}x (<= 0.25), "
                  f"time {ours_row['time_vs_naive']:.3f}x (<= 1.15), cpu time {ours_row['cpu_time_vs_naive']:.3f}x")
        payload["load_average"] = list(os.getloadavg())
    if args.note:
        payload["note"] = args.note
    write_results("linear_loss" + args.tag, payload, device=device)


if __name__ == "__main__":
    main()
