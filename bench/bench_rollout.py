"""Rollout throughput on CPU: NativeEngine against Hugging Face `generate(do_sample=True)` and VLLMEngine.

VLLMEngine (vLLM's CPU build, in .venv-vllm) joins when vLLM imports, with its OpenMP threads pinned to the
same count; its start-up, sleep/wake and weight-sync times are recorded too (`vllm_protocol` in the JSON).

Same random-weight Qwen2 (about 10M parameters, config below), same prompts, same thread count, T=1,
no top-k/top-p, in one run. Workloads:

- ``32x1``: 32 distinct ragged prompts (16..48 tokens unless ``--prompt-tokens``), 1 sample each, 64 new
  tokens, no early stop.
- ``4x8``: 4 prompts x 8 samples (a GRPO group shape); HF uses ``num_return_sequences=8``.
- ``32x1-stop``: like 32x1 but a stop set of 1/32 of the vocabulary ends rows at staggered steps
  (HF gets the same ids as ``eos_token_id``); NativeEngine compacting its batch when half the rows are
  done (the default), never, or whenever a row finishes.

NativeEngine runs with one seed for the call (one batched sampler call per step) and, as the trainer
calls it, with one seed per prompt (batch-independent samples; one batched sampler call per step with per-row seeds).

``native-unpacked`` is the trainer's call with the fused backend's matmuls on the weights in place (``F.linear``)
instead of oneDNN's packed copies (engines/onednn_weights.py).

The contenders are alternated run by run (one warm-up each first). Tokens/s counts generated tokens (up to and
including a stop token). Besides wall time each run records its process CPU time: with one thread that is the
compute the engine needed, which other jobs on a shared machine do not inflate; both speedups are reported. Two
model shapes, both ~10M parameters: a 16k vocabulary (LM head + sampling are ~40% of the FLOPs) and the project's
58-token character vocabulary (all FLOPs in the decoder body).

Run: ``python -m bench.bench_rollout [--threads 1] [--iters 3]`` from the repository root (with vLLM:
``.venv-vllm/bin/python -m bench.bench_rollout``, after ``bash scripts/vllm_env.sh``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `bench` and `erpo_fast` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from bench.common import peak_memory, print_table, write_results  # noqa: E402
from erpo_fast.engines import NativeEngine  # noqa: E402

MODELS = {
    "qwen2-v16k": dict(vocab_size=16384, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2),
    "qwen2-char": dict(vocab_size=58, hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                       num_attention_heads=6, num_key_value_heads=2),
}
# Real shapes (issue 24; random weights): SmolLM2-135M (a Llama) and Qwen2.5-0.5B, as in bench_vs_trl.py.
MODELS["C"] = dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3)
MODELS["D"] = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2)
NEW_TOKENS = 64
WORKLOADS = ("32x1", "4x8", "32x1-stop")


def build_model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = shape.get("arch") == "llama"
    arch = {k: v for k, v in shape.items() if k != "arch"}
    config = (LlamaConfig if llama else Qwen2Config)(**arch, tie_word_embeddings=True, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (LlamaForCausalLM if llama else Qwen2ForCausalLM)(config).eval()


def make_prompts(num: int, vocab: int, seed: int = 1, length_range: tuple[int, int] = (16, 48)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length_range[0], length_range[1] + 1, (num,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_runner(model, prompts, n: int, stops: list[int] | None):
    """HF generate on left-padded prompts (HF's own batching); returns a function giving #new tokens."""
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1

    def run() -> int:
        torch.manual_seed(0)  # every timed run draws the same tokens, so the work per run is fixed
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=NEW_TOKENS, num_return_sequences=n,
                                 eos_token_id=stops or None, pad_token_id=0)
        new = out[:, longest:]
        if not stops:
            return new.numel()
        hit = torch.isin(new, torch.tensor(stops))
        first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
        return int(first.sum())

    return run


def native_runner(engine, prompts, n: int, stops: list[int] | None, compact_below: float | None,
                  per_prompt_seeds: bool = False, pack_weights: bool | None = None, share_prompt_kv: bool = True):
    """Any engine's generate. NativeEngine only: ``compact_below`` (with it ``share_prompt_kv``) and ``pack_weights``
    (its fused backend) are set before each run; None leaves them (and ``share_prompt_kv``) alone."""
    seed = list(range(len(prompts))) if per_prompt_seeds else 0

    def run() -> int:
        if compact_below is not None:
            engine.compact_below = compact_below
            engine.share_prompt_kv = share_prompt_kv
        if pack_weights is not None:
            engine.runner.pack_weights = pack_weights
        out = engine.generate(prompts, [1.0] * len(prompts), n=n, max_new_tokens=NEW_TOKENS,
                              stop_token_ids=stops or [], seed=seed)
        return sum(len(s.token_ids) for group in out for s in group)

    return run


def vllm_engine(model, threads: int, workdir: Path, dtype: str = "float32") -> tuple[object, dict]:
    """A VLLMEngine (vLLM's CPU build here) on the same weights, and its start-up and protocol times.

    On the CPU build sleep and wake are no-ops (no sleep mode); they are timed anyway, as our side of the
    protocol. The sync is a full in-place reload of the model's weights from memory.
    """
    from erpo_fast.engines.base import verify_sync
    from erpo_fast.engines.vllm_engine import VLLMEngine, teacher_forced_logprobs

    model.save_pretrained(workdir)
    start = time.perf_counter()
    # vLLM's CPU worker pins its OpenMP threads (and then ignores torch.set_num_threads): as many as the others.
    engine = VLLMEngine(workdir, dtype=dtype, max_model_len=256, cpu_threads=threads, skip_tokenizer_init=True,
                        enable_prefix_caching=False)
    times = {"startup_s": time.perf_counter() - start}
    for key, call in (("sleep_s", engine.sleep), ("wake_s", engine.wake_up),
                      ("sync_s", lambda: engine.update_weights(model.named_parameters()))):
        start = time.perf_counter()
        call()
        times[key] = time.perf_counter() - start
    probe = list(range(3, 35))
    start = time.perf_counter()
    atol = 0.02 if dtype == "float32" else 0.05  # bf16 kernels differ by a few hundredths per token
    stats = verify_sync(engine.prompt_logprobs(probe), teacher_forced_logprobs(model, probe), atol=atol)
    times["sync_check_max_abs_diff"] = stats["max_abs_diff"]
    times["verify_sync_s"] = time.perf_counter() - start
    return engine, times


def measure(contenders: list, iters: int, with_memory: bool) -> list[dict]:
    """Each contender's median over ``iters`` timed runs, the contenders alternated run by run (so drift in the
    machine's speed reaches all of them alike), after one warm-up each."""
    tokens = [run() for _, run in contenders]  # warm-up, and each workload's token count (seeded: fixed per run)
    wall = [[] for _ in contenders]
    cpu = [[] for _ in contenders]
    for _ in range(iters):
        for i, (_, run) in enumerate(contenders):
            # Process CPU time besides wall time: on a shared machine other jobs inflate wall time, while
            # the CPU seconds this process burns (one thread) barely move.
            start_cpu, start = time.process_time(), time.perf_counter()
            run()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    rows = []
    for (name, run), n_tokens, walls, cpus in zip(contenders, tokens, wall, cpu):
        median_s, cpu_s = statistics.median(walls), statistics.median(cpus)
        row = {"engine": name, "median_s": median_s, "min_s": min(walls), "cpu_s": cpu_s, "new_tokens": n_tokens,
               "tok_per_s": n_tokens / median_s, "tok_per_cpu_s": n_tokens / cpu_s}
        if with_memory:
            row["extra_peak_mib"] = peak_memory(run) / 2**20
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for every engine)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["qwen2-v16k", "qwen2-char"], choices=list(MODELS))
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="add VLLMEngine (auto: when vLLM imports, e.g. in .venv-vllm)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute of every engine (bfloat16: oneDNN's AVX512-BF16 kernels on CPU)")
    parser.add_argument("--prompt-tokens", nargs=2, type=int, default=[16, 48], metavar=("MIN", "MAX"),
                        help="prompt lengths, drawn uniformly in [MIN, MAX]")
    parser.add_argument("--short", action="store_true",
                        help="only HF generate, NativeEngine as the trainer calls it, and vLLM (real-size models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from erpo_fast.engines import vllm_available

    with_vllm = args.vllm == "on" or (args.vllm == "auto" and vllm_available())

    rows, vllm_protocol = [], {}
    for model_name in args.models:
        model = build_model(MODELS[model_name]).to(getattr(torch, args.dtype))
        params = sum(p.numel() for p in model.parameters())
        vocab = MODELS[model_name]["vocab_size"]
        stops = list(range(3, vocab, 32))
        # One engine per backend (two fused engines on one model would keep re-fusing its weights).
        fused, hf_modules = NativeEngine(model), NativeEngine(model, backend="hf")
        engines = {"native": (fused, 0.5), "native-no-compaction": (fused, 0.0),
                   "native-compact-always": (fused, 1.0), "native-hf-modules": (hf_modules, 0.5)}
        vllm = None
        if with_vllm:
            import tempfile

            vllm, vllm_protocol[model_name] = vllm_engine(model, args.threads, Path(tempfile.mkdtemp()), args.dtype)
            print(f"vLLM on {model_name}: " + ", ".join(f"{k} {v:.3g}" for k, v in vllm_protocol[model_name].items()))
        lengths = tuple(args.prompt_tokens)
        workloads = [("32x1", make_prompts(32, vocab, length_range=lengths), 1, None),
                     ("4x8", make_prompts(4, vocab, length_range=lengths), 8, None),
                     ("32x1-stop", make_prompts(32, vocab, length_range=lengths), 1, stops)]
        for workload, prompts, n, stop in workloads:
            if workload not in args.workloads:
                continue
            contenders = [("hf-generate", hf_runner(model, prompts, n, stop))]
            for engine_name, (engine, compact_below) in ({} if args.short else engines).items():
                if "compact" in engine_name and stop is None:
                    continue  # identical to "native" without stops
                pack = True if engine is fused else None
                contenders.append((engine_name, native_runner(engine, prompts, n, stop, compact_below, False, pack)))
            # What the trainer uses: one seed per prompt (one batched sampler call per step with per-row seeds).
            contenders.append(("native-per-prompt-seeds", native_runner(fused, prompts, n, stop, 0.5, True, True)))
            # The same with F.linear on the weights in place of oneDNN's packed copies (engines/onednn_weights.py),
            # and with each row holding and reading its own copy of its prompt's k/v (engines/prompt_kv.py).
            contenders.append(("native-unpacked", native_runner(fused, prompts, n, stop, 0.5, True, False)))
            if n > 1:
                contenders.append(("native-per-row-kv", native_runner(fused, prompts, n, stop, 0.5, True, True, False)))
            if vllm is not None:  # as the trainer calls it: per-prompt seeds
                contenders.append(("vllm-per-prompt-seeds", native_runner(vllm, prompts, n, stop, None, True)))
            results = measure(contenders, args.iters, with_memory=workload == "32x1")
            hf = results[0]
            for r in results:
                r.update(model=model_name, params=params, workload=workload, rows=len(prompts) * n,
                         speedup_vs_hf=r["tok_per_s"] / hf["tok_per_s"],
                         cpu_speedup_vs_hf=r["tok_per_cpu_s"] / hf["tok_per_cpu_s"])
                rows.append(r)
            print_table(results, ["engine", "median_s", "cpu_s", "new_tokens", "tok_per_s", "speedup_vs_hf",
                                  "cpu_speedup_vs_hf", "extra_peak_mib"],
                        title=f"{model_name} ({params:,} params), workload {workload}, threads={args.threads}, "
                              f"{args.dtype}")
        if vllm is not None:
            vllm.close()  # one vLLM engine per process at a time

    default = args.models == [m for m in MODELS if m not in ("C", "D")] and not args.short
    name = "rollout" if default else "rollout_" + "".join(args.models)
    if args.prompt_tokens != [16, 48]:
        name += "_prompts{}-{}".format(*args.prompt_tokens)
    write_results(name + ("" if args.dtype == "float32" else f"_{args.dtype}"), {
        "threads": args.threads, "dtype": args.dtype,
        "iters": args.iters,
        "new_tokens_per_row": NEW_TOKENS, "prompt_tokens": args.prompt_tokens,
        "load_average_at_end": os.getloadavg(),
        "models": {name: {**MODELS[name], "tie_word_embeddings": True} for name in args.models},
        "workloads": args.workloads, "contenders": "short" if args.short else "all",
        "rows": rows,
        # vLLM's CPU build (when run): engine start-up, sleep/wake (no-ops without sleep mode), full weight
        # sync from memory and the probe check, in seconds. Not GPU figures.
        "vllm_protocol": vllm_protocol,
    })


if __name__ == "__main__":
    main()
