"""The first-GPU proof: environment, correctness, fused loss, sampler, learner step, colocated vLLM, in phases.

Each phase has its own deadline, writes ``$OUT/<phase>.json`` as soon as it ends and prints one table row, so a
run that is cut off still reports what it finished. Goals print as PASS / FAIL / n/a.

- P0 environment: versions, SMs, measured bf16 matmul peak (8192^3) and device copy bandwidth (4 GiB); starts
  the csrc CUDA build in the background (one arch, this device's).
- P1 correctness on CUDA: fused log-probs, entropy, grad-hidden, grad-W and the GRPO loss against float64 at
  (333, 256, 32003) and (2000, 896, 151936), temperatures log-uniform in [0.05, 4], 10% ignored labels, forced
  multi-chunk; no recompile across temperatures; sampler chi-square (20k draws); the kernel tests on CUDA.
- P2 fused loss at the 7B head (N=8192, H=3584, V=151,936, bf16): ours fwd+bwd and fwd only, torch full
  logits, Liger (if installed); time, TFLOP/s, extra memory; n_regs / n_spills of the compiled kernels.
- P3 sampler at B in {1, 64, 256}, with and without top-k/top-p: triton, csrc, torch, against the copy floor.
- P4 learner step on random Qwen2 0.5B / 1.5B shapes, 8 prompts x 8, 128 + 384 tokens: time against the
  6N-FLOP floor, peak memory against this script's own estimate.
- P5 colocated vLLM (0.5B shapes), in a child process (vLLM keeps process-wide state): start, generate seeded
  and unseeded, sleep and memory freed, learner step, reload, wake, verify_sync, mismatch metrics, tokens/s.
- P6 async rollout (``trainer.async_steps 1``) on this device: the tiny built-in job, 4 steps with the rollout
  process beside the learner on the one GPU (weight slots through CUDA IPC), then an exact resume.
- P7 LoRA (``model.lora_rank 8``): the tiny built-in job, 3 steps (sync probe every step) with the native engine
  applying the adapters, and with vLLM (when it imports) served a LoRARequest per version and sent merged weights;
  engine and learner log-probs must agree on every trained token.

``--rehearse`` runs every phase on the CPU at tiny shapes (Triton interpreter; P5 needs vLLM, i.e. .venv-vllm):
tests/test_gpu_proof.py runs it in CI. Run from the repository root: ``python bench/gpu_proof.py`` (no install
needed). The device call plan is in bench/GPU.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run by path: `bench` and `erpo_fast` from the checkout
    sys.path.insert(0, str(ROOT))

PHASES = ("P0", "P1", "P2", "P3", "P4", "P5", "P6", "P7")
# Deadlines in seconds (GPU, rehearsal). bench/GPU.md's call plan adds these up.
DEADLINES = {"P0": (30, 60), "P1": (100, 150), "P2": (70, 60), "P3": (40, 60), "P4": (80, 90), "P5": (200, 240),
             "P6": (90, 150), "P7": (120, 240)}
VOCAB = 151936
QWEN2_SHAPES = {  # Qwen2.5 0.5B / 1.5B (hidden, intermediate, layers, heads, kv heads), tied embeddings
    "0.5B": (896, 4864, 24, 14, 2),
    "1.5B": (1536, 8960, 28, 12, 2),
}


# P6: the tiny built-in job of tests/test_async.py, 4 async steps, a checkpoint every 2.
P6_ARGS = ["--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2", "--builtin.kv_heads", "1",
           "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "20", "--builtin.task", "arithmetic",
           "--builtin.warm_start_problems", "2000", "--builtin.warm_start_batch_size", "16",
           "--builtin.num_train", "64", "--builtin.num_heldout", "8", "--trainer.prompts_per_step", "4",
           "--rollout.n", "4", "--rollout.max_new_tokens", "6", "--trainer.eval_every", "2", "--trainer.eval_k", "2",
           "--data.reward_workers", "0", "--logging.progress", "false", "--logging.plots", "false",
           "--trainer.threads", "1", "--trainer.lr", "1e-3", "--rollout.sync_check_every", "1",
           "--trainer.save_every", "2", "--max-steps", "4", "--trainer.async_steps", "1"]


# P7: LoRA on a tiny built-in model (head_dim 32: vLLM's CPU attention in the rehearsal rejects 16).
P7_ARGS = [*P6_ARGS[:P6_ARGS.index("--trainer.async_steps")], "--builtin.hidden_size", "64", "--builtin.heads", "2",
           "--builtin.intermediate_size", "128", "--max-steps", "3", "--trainer.eval_every", "0",
           "--trainer.save_every", "0", "--model.lora_rank", "8", "--trainer.lr", "2e-2",
           # every sequence runs, so the engine/learner mismatch is measured on every step's tokens
           "--trainer.skip_zero_advantage", "false"]


class PhaseTimeout(Exception):
    pass


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def goal(value, target, ok, *, perf: bool = False) -> dict:
    """A goal line. ``perf`` goals (speed, memory) are not judged in the rehearsal: a CPU under the Triton
    interpreter says nothing about a GPU, so they print n/a there; correctness goals are judged everywhere."""
    if perf and os.environ.get("ERPO_PROOF_REHEARSE") == "1":
        ok = None
    return {"value": value, "target": target, "pass": ok}


def chi_square_p(observed, expected) -> float:
    """Pearson chi-square p-value (cells with expected >= 5 kept, the rest pooled), via torch's gamma function,
    so the script needs no scipy (the GPU image has none)."""
    import torch

    obs, exp = torch.as_tensor(observed, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    big = exp >= 5
    obs = torch.cat([obs[big], obs[~big].sum().reshape(1)]) if (~big).any() else obs
    exp = torch.cat([exp[big], exp[~big].sum().reshape(1)]) if (~big).any() else exp
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class Proof:
    def __init__(self, rehearse: bool, out: Path):
        import torch

        self.torch = torch
        self.rehearse = rehearse
        self.cuda = torch.cuda.is_available() and not rehearse
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.out = out
        self.env: dict = {}
        self.csrc_thread = None

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def timeit(self, fn, iters: int, warmup: int = 1) -> float:
        """Median seconds of fn() (CUDA synchronised)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def peak_extra(self, fn) -> int | None:
        """Extra CUDA allocator peak over what was allocated before fn() (None on the CPU)."""
        if not self.cuda:
            fn()
            return None
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def peak_tflops(self) -> float | None:
        return self._p0("matmul_tflops")

    def copy_bytes_per_s(self) -> float | None:
        tbps = self._p0("copy_tbps")
        return None if tbps is None else tbps * 1e12

    def _p0(self, key):
        path = self.out / "P0.json"
        if key not in self.env and path.is_file():
            self.env.update(json.loads(path.read_text()).get("data", {}))
        return self.env.get(key)

    # ---- P0 ------------------------------------------------------------------------------------------------

    def p0(self) -> dict:
        torch = self.torch
        data = {
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: _pkg_version(name) for name in ("triton", "transformers", "numba", "vllm", "liger-kernel",
                                                     "flash-attn", "scipy")},
            "device": torch.cuda.get_device_name() if self.cuda else f"cpu-{platform.machine()}-{os.cpu_count()}",
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            data.update(sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                        capability=".".join(map(str, torch.cuda.get_device_capability())))
            from torch.utils.cpp_extension import CUDA_HOME

            data["cuda_home"] = CUDA_HOME
        from erpo_fast.csrc import prebuild_in_background

        self.csrc_thread = prebuild_in_background()  # nvcc runs while the next phases measure
        self.csrc_started = time.perf_counter()
        n = 256 if self.rehearse else 8192
        dtype = torch.float32 if self.rehearse else torch.bfloat16
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        t = self.timeit(functools.partial(torch.matmul, a, b), iters=3 if self.rehearse else 20,
                        warmup=1 if self.rehearse else 3)
        data["matmul_tflops"] = 2 * n**3 / t / 1e12
        data["matmul_shape"] = [n, n, n, str(dtype)]
        del a, b
        nbytes = (64 << 20) if self.rehearse else (4 << 30)
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        t = self.timeit(functools.partial(dst.copy_, src), iters=3 if self.rehearse else 10)
        data["copy_tbps"] = 2 * nbytes / t / 1e12  # read + write
        data["copy_bytes"] = nbytes
        del src, dst
        self.env.update(data)
        summary = (f"{data['device']}: matmul {data['matmul_tflops']:.3g} TFLOP/s, copy {data['copy_tbps']:.3g} "
                   f"TB/s, torch {data['torch']}, triton {data['triton']}, vllm {data['vllm']}")
        return {"data": data, "summary": summary, "goals": {}}

    # ---- P1 ------------------------------------------------------------------------------------------------

    def p1(self) -> dict:
        torch = self.torch
        from erpo_fast.kernels.fused_linear import linear_grpo_loss, linear_logprobs
        from erpo_fast.kernels.fused_linear import triton_kernels as tk

        shapes = [(33, 32, 301), (45, 40, 517)] if self.rehearse else [(333, 256, 32003), (2000, 896, VOCAB)]
        cases = [(shapes[0], torch.float32), (shapes[0], torch.bfloat16), (shapes[1], torch.bfloat16)]
        tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
        rows, goals = [], {}

        def rel(out, ref):
            out, ref = out.detach().double(), ref.detach().double()
            return float((out - ref).norm() / ref.norm().clamp(min=1e-30))

        saved = tk.ROW_CHUNK_BYTES
        try:
            for (n, h, v), dtype in cases:
                g = torch.Generator().manual_seed(n + v)
                hidden = torch.randn(n, h, generator=g).to(dtype)
                weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(dtype)
                labels = torch.randint(0, v, (n,), generator=g)
                labels[torch.rand(n, generator=g) < 0.1] = -100
                temp = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(4.0), generator=g))
                coef = torch.randn(n, generator=g)
                adv, mask = torch.randn(n, generator=g), labels != -100
                hidden, weight, labels, temp, coef, adv, mask = (x.to(self.device) for x in
                                                                 (hidden, weight, labels, temp, coef, adv, mask))
                # forced multi-chunk: three row chunks whatever the device's budget
                tk.ROW_CHUNK_BYTES = math.ceil(n / 3) * v * (4 + hidden.element_size())

                def logprob_pass(backend, hid, w, labels=labels, temp=temp, coef=coef):
                    hh, ww = hid.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
                    lp, ent = linear_logprobs(hh, ww, labels, temp, return_entropy=True, backend=backend)
                    ((lp * coef.to(lp.dtype)).sum() + (ent * coef.flip(0).to(ent.dtype)).sum()).backward()
                    return lp, ent, hh.grad, ww.grad

                with torch.no_grad():
                    old = linear_logprobs(hidden.double(), weight.double(), labels, temp, backend="reference")
                old = (old + 0.2 * torch.randn(n, generator=g).to(self.device)).float()

                def loss_pass(backend, hid, w, labels=labels, temp=temp, adv=adv, mask=mask, old=old):
                    hh, ww = hid.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
                    loss, _ = linear_grpo_loss(hh, ww, labels, temp, adv, mask, old_logprobs=old, ref_logprobs=old,
                                               kl_beta=0.04, kl_estimator="k3", loss_agg="token_mean", backend=backend)
                    loss.backward()
                    return loss, hh.grad, ww.grad

                ours = logprob_pass("triton", hidden, weight) + loss_pass("triton", hidden, weight)
                ref = logprob_pass("reference", hidden.double(), weight.double()) + \
                    loss_pass("reference", hidden.double(), weight.double())
                names = ("logprobs", "entropy", "grad_hidden", "grad_weight", "loss", "loss_grad_hidden",
                         "loss_grad_weight")
                errs = {k: rel(o, r) for k, o, r in zip(names, ours, ref)}
                worst = max(errs.values())
                ok = worst < tolerance[dtype] and all(bool(torch.isfinite(o).all()) for o in ours)
                key = f"{n}x{h}x{v}-{str(dtype).replace('torch.', '')}"
                rows.append({"case": key, "chunks": 3, **errs})
                goals[f"fused {key} rel err < {tolerance[dtype]:g}"] = goal(worst, tolerance[dtype], ok)
                del ours, ref
        finally:
            tk.ROW_CHUNK_BYTES = saved

        if self.cuda:  # a new temperature never compiles anything
            def cache_sizes():
                return [sum(len(c[0]) for c in k.device_caches.values())
                        for k in (tk._logits_stats_kernel, tk._grad_logits_kernel)]

            n, h, v = 300, 64, 1003
            hidden = torch.randn(n, h, device="cuda")
            weight = torch.randn(v, h, device="cuda") / 8
            labels = torch.randint(0, v, (n,), device="cuda")

            def step(t):
                hh = hidden.clone().requires_grad_(True)
                linear_grpo_loss(hh, weight, labels, t, torch.randn(n, device="cuda"), torch.ones(n, device="cuda"),
                                 backend="triton")[0].backward()
                torch.cuda.synchronize()

            step(torch.rand(n, device="cuda") + 0.5)
            before = cache_sizes()
            for t in (torch.rand(n, device="cuda") * 3 + 0.05, 0.7, 2.5):
                step(t)
            goals["no recompile across temperatures"] = goal(cache_sizes(), before, cache_sizes() == before)
        else:
            goals["no recompile across temperatures"] = goal("interpreter: tests/test_fused_linear.py checks the "
                                                             "compile keys", None, None)

        goals.update(self._sampler_chi_square())
        goals.update(self._pytest())
        worst = [max(v for k, v in r.items() if k not in ("case", "chunks")) for r in rows]
        return {"data": {"rows": rows}, "goals": goals,
                "summary": "; ".join(f"{r['case']} max rel err {w:.2g}" for r, w in zip(rows, worst))}

    def _sampler_chi_square(self) -> dict:
        torch = self.torch
        from erpo_fast.kernels.sampling import processed_logprobs_reference, sample_tokens

        draws = 2000 if self.rehearse else 20000
        g = torch.Generator().manual_seed(5)
        row = torch.randn(64, generator=g) * 2
        goals = {}
        for t, k, p in ((0.7, 0, 1.0), (1.3, 20, 0.8)):
            logits = row.expand(draws, -1).contiguous().to(self.device)
            for seeds in (123, torch.arange(draws, device=self.device)):
                tokens, _ = sample_tokens(logits, t, top_k=k or None, top_p=p, seed=seeds, backend="triton")
                expected = processed_logprobs_reference(row[None], torch.tensor([t]), torch.tensor([k]),
                                                        torch.tensor([p]))[0].exp() * draws
                counts = torch.bincount(tokens.cpu(), minlength=64).double()
                outside = int(counts[expected == 0].sum())
                pval = chi_square_p(counts, expected)
                kind = "row seeds" if isinstance(seeds, torch.Tensor) else "one seed"
                goals[f"sampler chi-square T={t} k={k} p={p} ({kind}, {draws} draws)"] = goal(
                    pval, "> 1e-3", pval > 1e-3 and outside == 0)
        return goals

    def _pytest(self) -> dict:
        """The kernel tests: on CUDA, the triton ones run on the GPU now (device fixture), plus the `gpu` ones."""
        files = ["tests/test_fused_linear.py", "tests/test_sampling.py", "tests/test_csrc_sampling.py"]
        select = ["-m", "gpu"] if self.rehearse else ["-k", "triton or gpu or cuda"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, *files]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        ok = done.returncode == 0 or (self.rehearse and done.returncode == 5)  # 5: everything deselected
        if not ok:
            print(done.stdout[-4000:], done.stderr[-2000:], file=sys.stderr)
        return {f"pytest {' '.join(select)}": goal(last, "all pass", ok)}

    # ---- P2 ------------------------------------------------------------------------------------------------

    def p2(self) -> dict:
        torch = self.torch
        from bench.bench_linear_loss import liger, make_problem, ours
        from erpo_fast.kernels.fused_linear import linear_logprobs

        n, h, v = (48, 32, 1024) if self.rehearse else (8192, 3584, VOCAB)
        dtype = torch.float32 if self.rehearse else torch.bfloat16
        p = make_problem(n, h, v, dtype, str(self.device))
        iters = 1 if self.rehearse else 5
        flops = 6.0 * n * h * v

        def forward_only():
            with torch.no_grad():
                linear_logprobs(p["hidden"], p["weight"], p["labels"], p["temperature"], backend="triton")

        contenders = {"ours fwd+bwd": ours(p, "triton"), "ours fwd only": forward_only,
                      "torch full logits": ours(p, "reference")}
        try:
            contenders["liger"] = liger(p, compiled=self.cuda)
        except ImportError:
            contenders["liger"] = None
        rows = {}
        for name, fn in contenders.items():
            if fn is None:
                rows[name] = {"status": "not installed"}
                continue
            try:
                extra = self.peak_extra(fn)  # first call doubles as the warm-up (and Liger's compile)
                sec = self.timeit(fn, iters=iters, warmup=0)
            except Exception as exc:  # one contender failing (OOM, say) must not hide the others
                rows[name] = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
                continue
            f = flops / 3 if name == "ours fwd only" else flops
            rows[name] = {"status": "ok", "seconds": sec, "tflops": f / sec / 1e12,
                          "extra_gb": None if extra is None else extra / 1e9}
        ours_row, torch_row, liger_row = rows["ours fwd+bwd"], rows["torch full logits"], rows["liger"]
        peak = self.peak_tflops()
        goals = {}
        if ours_row.get("status") == "ok":
            if torch_row.get("status") == "ok":
                speedup = torch_row["seconds"] / ours_row["seconds"]
                goals["fused >= 1.3x faster than torch full logits"] = goal(speedup, 1.3, speedup >= 1.3, perf=True)
            if liger_row.get("status") == "ok":
                ratio = liger_row["seconds"] / ours_row["seconds"]
                goals["fused not slower than Liger"] = goal(ratio, 1.0, ratio >= 1.0, perf=True)
            else:
                goals["fused not slower than Liger"] = goal(liger_row.get("status"), 1.0, None, perf=True)
            frac = ours_row["tflops"] / peak if peak else None
            goals["fused >= 70% of measured matmul peak"] = goal(frac, 0.7, None if frac is None else frac >= 0.7,
                                                                 perf=True)
            extra = ours_row["extra_gb"]
            goals["fused extra memory <= 5 GB"] = goal(extra, 5.0, None if extra is None else extra <= 5.0, perf=True)
        data = {"shape": [n, h, v, str(dtype)], "rows": rows, "kernels": kernel_resources()}
        summary = ", ".join(f"{k} {r['seconds'] * 1e3:.1f} ms" if r.get("status") == "ok" else f"{k} {r['status']}"
                            for k, r in rows.items())
        return {"data": data, "goals": goals, "summary": summary}

    # ---- P3 ------------------------------------------------------------------------------------------------

    def p3(self) -> dict:
        torch = self.torch
        from erpo_fast.kernels.sampling import sample_tokens

        if self.csrc_thread is not None:  # the background build started in P0
            self.csrc_thread.join(timeout=max(1.0, DEADLINES["P3"][0] / 3))
        csrc_error = None
        try:
            from erpo_fast.csrc import _with_cuda, load_ops

            if self.cuda and not _with_cuda():
                csrc_error = "no CUDA build (no CUDA_HOME / nvcc in this image)"
            elif self.csrc_thread is not None and self.csrc_thread.is_alive():
                csrc_error = "still building"
            else:
                load_ops()
        except RuntimeError as exc:
            csrc_error = f"build failed: {str(exc).splitlines()[0][:150]}"
        v = 2048 if self.rehearse else VOCAB
        batches = (1, 8) if self.rehearse else (1, 64, 256)
        iters = 2 if self.rehearse else 20
        copy_bps = self.copy_bytes_per_s()
        rows, goals = [], {}
        for b in batches:
            logits = torch.randn(b, v, device=self.device) * 3
            temp = torch.rand(b, device=self.device) + 0.5
            floor = None if copy_bps is None else b * v * 4 / copy_bps
            for filt in ({}, {"top_k": 50, "top_p": 0.9}):
                row = {"B": b, "V": v, "filters": "top-k/top-p" if filt else "none", "floor_s": floor}
                for backend in ("triton", "csrc", "torch"):
                    if backend == "csrc" and csrc_error:
                        row[backend] = csrc_error
                        continue
                    try:
                        row[f"{backend}_s"] = self.timeit(
                            functools.partial(sample_tokens, logits, temp, seed=1, backend=backend, **filt),
                            iters=iters)
                    except Exception as exc:
                        row[backend] = f"error: {type(exc).__name__}: {str(exc)[:150]}"
                rows.append(row)
        big = next(r for r in rows if r["B"] == batches[-1] and r["filters"] == "none")
        if "triton_s" in big and big["floor_s"]:
            ratio = big["triton_s"] / big["floor_s"]
            goals[f"sampler B={batches[-1]} no filters <= 2x copy floor"] = goal(ratio, 2.0, ratio <= 2.0, perf=True)
        summary = ", ".join(f"B={r['B']} {r['filters']}: triton {r.get('triton_s', float('nan')) * 1e6:.0f} us"
                            for r in rows)
        return {"data": {"rows": rows, "csrc": csrc_error or "ok"}, "goals": goals, "summary": summary}

    # ---- P4 ------------------------------------------------------------------------------------------------

    def p4(self) -> dict:
        torch = self.torch
        sizes = {"tiny": (64, 128, 2, 4, 2)} if self.rehearse else QWEN2_SHAPES
        vocab = 1000 if self.rehearse else VOCAB
        prompts, group, p_len, r_len = (2, 2, 8, 8) if self.rehearse else (8, 8, 128, 384)
        rows, goals = [], {}
        for name, (hid, inter, layers, heads, kv) in sizes.items():
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            learner, seqs, params = self._learner(hid, inter, layers, heads, kv, vocab, prompts, group, p_len, r_len)
            tokens = prompts * p_len + prompts * group * r_len  # a group's prompt runs once (packed attention)
            sec = self.timeit(functools.partial(learner.train_on, seqs), iters=1 if self.rehearse else 2)
            peak = torch.cuda.max_memory_allocated() if self.cuda else None
            estimate = memory_estimate(params, hid, inter, layers, vocab, tokens, learner)
            tflops = self.peak_tflops()
            floor = 6 * params * tokens / (tflops * 1e12) if tflops else None
            row = {"model": name, "params": params, "tokens": tokens, "seconds": sec, "floor_6N_s": floor,
                   "peak_gib": None if peak is None else peak / 2**30, "estimate_gib": estimate / 2**30}
            rows.append(row)
            if floor:
                goals[f"learner {name} step within 2x of 6N floor"] = goal(sec / floor, 2.0, sec / floor <= 2.0,
                                                                           perf=True)
            if peak is not None:
                goals[f"learner {name} peak vs script's estimate"] = goal(peak / estimate, "report", None, perf=True)
            del learner, seqs
        summary = ", ".join(f"{r['model']} {r['seconds']:.2f} s (floor {r['floor_6N_s'] or 0:.2f} s)" for r in rows)
        return {"data": {"rows": rows}, "goals": goals, "summary": summary}

    def _learner(self, hid, inter, layers, heads, kv, vocab, prompts, group, p_len, r_len):
        torch = self.torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from erpo_fast.batch import RolloutSequence
        from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
        from erpo_fast.learner import Learner

        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hid, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                          max_position_embeddings=4096, attn_implementation="sdpa")
        with torch.device(self.device):  # random init on the device: seconds, not minutes, at 1.5B
            model = Qwen2ForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters())
        learner = Learner(model, AlgorithmConfig(), TrainerConfig(micro_batch_size=prompts * group), ModelConfig(),
                          device=self.device, max_len=r_len)
        g = torch.Generator().manual_seed(0)
        seqs = []
        for i in range(prompts):
            prompt = torch.randint(3, vocab, (p_len,), generator=g).tolist()
            for j in range(group):
                seqs.append(RolloutSequence(prompt_ids=prompt,
                                            response_ids=torch.randint(3, vocab, (r_len,), generator=g).tolist(),
                                            rollout_logprobs=[], temperature=0.7 + 0.1 * i,
                                            advantage=float(torch.randn(1, generator=g)),
                                            seq_key=i * group + j))
        return learner, seqs, params

    # ---- P5 ------------------------------------------------------------------------------------------------

    def p5(self) -> dict:
        if importlib.util.find_spec("vllm") is None:
            return {"status": "skipped", "summary": "vLLM does not import here (see bench/GPU.md: carried wheels)",
                    "goals": {}, "data": {}}
        from bench.gpu_proof_vllm import run_colocated

        return run_colocated(self)

    # ---- P6 ------------------------------------------------------------------------------------------------

    def p6(self) -> dict:
        """trainer.async_steps 1 on this device: the rollout process and the learner both on it (one GPU: the
        weight slots reach the rollout process through CUDA IPC), the tiny built-in job for 4 steps (sync probe
        every step), then a resume from its step-2 checkpoint, which must log what the uninterrupted run logged."""
        import shutil

        env = dict(os.environ, ERPO_FAST_CACHE=str(self.out / "p6_cache"))
        env.pop("TRITON_INTERPRET", None)  # as a user runs it
        device = ["--trainer.device", "cuda", "--rollout.device", "cuda:0"] if self.cuda else \
            ["--trainer.device", "cpu"]

        def train(out: Path, *extra: str) -> list[dict]:
            done = subprocess.run([sys.executable, "-m", "erpo_fast.train", *P6_ARGS, *device, "--output-dir",
                                   str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"train exited {done.returncode}: {tail}")
            return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

        full, part = self.out / "p6_full", self.out / "p6_part"
        for d in (full, part):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        a = train(full)
        seconds = time.perf_counter() - t0
        shutil.copytree(full, part)
        shutil.rmtree(part / "checkpoints" / "step_00000004")
        b = train(part, "--resume")

        def strip(records):
            return [{k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))} for r in records]

        versions = [r["policy_version"] for r in a]
        same = strip(a) == strip(b)
        goals = {"batches sampled exactly one update behind": goal(versions, [0, 0, 1, 2], versions == [0, 0, 1, 2]),
                 "resume with a batch in flight logs the uninterrupted run": goal(same, True, same),
                 "4 async steps (sync probe every step) within 60 s": goal(seconds, 60, seconds <= 60, perf=True)}
        return {"data": {"seconds": seconds, "metrics": a}, "goals": goals,
                "summary": f"4 async steps in {seconds:.1f} s (process start, warm start and held-out evals included)"}


    # ---- P7 ------------------------------------------------------------------------------------------------

    def p7(self) -> dict:
        """LoRA end to end on this device: native engine (adapters in its forward), and vLLM with adapters
        (LoRARequest) and with merged weights when vLLM imports; each run's sync probe passes every step."""
        env = dict(os.environ, ERPO_FAST_CACHE=str(self.out / "p7_cache"))
        env.pop("TRITON_INTERPRET", None)
        device = ["--trainer.device", "cuda" if self.cuda else "cpu"]
        runs = {"native adapters": ["--rollout", "native"]}
        if importlib.util.find_spec("vllm") is not None:
            runs.update({"vllm adapters": ["--rollout", "vllm", "--rollout.lora_sync", "adapters"],
                         "vllm merged": ["--rollout", "vllm", "--rollout.lora_sync", "merged"]})
        data, goals = {}, {}
        for name, extra in runs.items():
            out = self.out / f"p7_{name.replace(' ', '_')}"
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "erpo_fast.train", *P7_ARGS, *device, *extra,
                                   "--output-dir", str(out), "--overwrite"], cwd=ROOT, env=env, capture_output=True,
                                  text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"{name}: train exited {done.returncode}: {tail}")
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            # measured on the steps where the learner ran a sequence (none: a step of uniform groups only)
            measured = [r["mismatch_logp_abs_max"] for r in records if "mismatch_logp_abs_max" in r]
            worst = max(measured) if measured else math.nan
            data[name] = {"seconds": time.perf_counter() - t0, "mismatch_logp_abs_max": worst,
                          "mismatch_steps": len(measured), "sync_bytes": records[-1]["sync_bytes"],
                          "time_sync_s": [r["time_sync_s"] for r in records]}
            goals[f"{name}: 3 steps, sync probe every step, engine = learner (max |d logp| <= 0.05)"] = goal(
                worst, 0.05, bool(measured) and worst <= 0.05)
        summary = ", ".join(f"{n} {d['seconds']:.0f} s ({d['sync_bytes'] / 1e3:.0f} kB/sync)" for n, d in data.items())
        return {"data": data, "goals": goals, "summary": summary}


def kernel_resources() -> list[dict]:
    """n_regs / n_spills of every compiled variant of our Triton kernels (none under the interpreter)."""
    from erpo_fast.kernels.fused_linear import triton_kernels as fl
    from erpo_fast.kernels.sampling import triton_kernels as sk

    rows = []
    for name, kernel in (("logits_stats", fl._logits_stats_kernel), ("grad_logits", fl._grad_logits_kernel),
                         ("sample", sk._sample_kernel), ("threshold", sk._threshold_kernel)):
        for device, cache in getattr(kernel, "device_caches", {}).items():
            for compiled in cache[0].values():
                with contextlib.suppress(Exception):
                    compiled._init_handles()
                meta = getattr(compiled, "metadata", None)
                rows.append({"kernel": name, "device": str(device), "n_regs": getattr(compiled, "n_regs", None),
                             "n_spills": getattr(compiled, "n_spills", None),
                             "num_warps": getattr(meta, "num_warps", None),
                             "shared_bytes": getattr(meta, "shared", None)})
    for r in rows:
        print(f"    kernel {r['kernel']:13s} n_regs {r['n_regs']}  n_spills {r['n_spills']}  warps {r['num_warps']}  "
              f"smem {r['shared_bytes']}")
    return rows


def memory_estimate(params: int, hidden: int, inter: int, layers: int, vocab: int, tokens: int, learner) -> int:
    """This script's own estimate of the learner's peak (there is no memory plan yet): fp32 weights, grads and
    AdamW state (16 B/param), the autocast bf16 weight copies (2 B/param), activations kept for backward
    (~(16 H + 6 I) bytes per token per layer in bf16 without recompute; sdpa keeps no [T, T] scores), and the
    fused head (its [rows, V] buffers plus fp32 grad-W and its bf16 cast)."""
    from erpo_fast.kernels.fused_linear import triton_kernels as tk

    act = (16 * hidden + 6 * inter) * tokens * layers
    if learner.model_cfg.gradient_checkpointing:
        act = 2 * hidden * tokens * layers + (16 * hidden + 6 * inter) * tokens
    head = tk.chunk_bytes(learner.device) + 6 * vocab * hidden if learner.device.type == "cuda" else 0
    return 18 * params + act + head


# ---- the driver --------------------------------------------------------------------------------------------

def _alarm(signum, frame):
    raise PhaseTimeout()


def run_phase(proof: Proof, name: str, deadline: float) -> dict:
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(deadline))
    try:
        result = getattr(proof, name.lower())()
        result.setdefault("status", "ok")
    except PhaseTimeout:
        result = {"status": "timeout", "summary": f"deadline {deadline:.0f} s passed", "goals": {}}
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "error", "summary": f"{type(exc).__name__}: {str(exc)[:300]}", "goals": {}}
    finally:
        signal.alarm(0)
    if any(g.get("pass") is False for g in result.get("goals", {}).values()) and result["status"] == "ok":
        result["status"] = "goals failed"
    result.update(phase=name, seconds=time.perf_counter() - t0, deadline_s=deadline, rehearse=proof.rehearse)
    return result


def run_child(name: str, args, deadline: float) -> dict:
    """A phase in its own process (vLLM): its JSON comes back through $OUT."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phases", name, "--out", str(args.out), "--child"]
    if args.rehearse:
        cmd.append("--rehearse")
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, cwd=ROOT, timeout=deadline + 30)
    except subprocess.TimeoutExpired:
        return {"phase": name, "status": "timeout", "seconds": time.perf_counter() - t0, "goals": {},
                "summary": f"child process passed {deadline + 30:.0f} s"}
    path = args.out / f"{name}.json"
    if not path.is_file():
        return {"phase": name, "status": "error", "seconds": time.perf_counter() - t0, "goals": {},
                "summary": "child process wrote no result"}
    return json.loads(path.read_text())


def print_row(result: dict) -> None:
    goals = result.get("goals", {})
    marks = []
    for text, g in goals.items():
        flag = {True: "PASS", False: "FAIL", None: "n/a"}[g.get("pass")]
        value = g.get("value")
        value = f"{value:.3g}" if isinstance(value, float) else value
        marks.append(f"{flag} {text} ({value})")
    print(f"| {result['phase']} | {result['status']} | {result['seconds']:.1f} s | {result.get('summary', '')} |",
          flush=True)
    for m in marks:
        print(f"|    | {m}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="every phase on the CPU at tiny shapes")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, e.g. P0,P2")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default: $OUT, else bench/results)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rehearse:
        os.environ["ERPO_PROOF_REHEARSE"] = "1"  # read by goal(), in the P5 child too
    phases = [p.strip().upper() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; valid: {', '.join(PHASES)}")
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the rehearsal is the CPU path, even on a GPU box
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the carried wheels ship FlashInfer JIT-only
    args.out = (args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu_proof")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    proof = Proof(args.rehearse, args.out)
    results = []
    if not args.child:
        print(f"gpu_proof: {'rehearsal on the CPU' if args.rehearse else proof.device}, results in {args.out}")
        print("| phase | status | time | summary |\n|---|---|---|---|", flush=True)
    for name in phases:
        deadline = DEADLINES[name][1 if args.rehearse else 0]
        if name == "P5" and not args.child:
            result = run_child(name, args, deadline)
        else:
            result = run_phase(proof, name, deadline)
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not args.child:
            print_row(result)
        results.append(result)
    if not args.child:
        from bench.common import git_commit

        summary = {"commit": git_commit(), "device": proof.env.get("device") or str(proof.device),
                   "rehearse": args.rehearse, "phases": {r["phase"]: r["status"] for r in results}}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    bad = [r for r in results if r["status"] in ("error", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
