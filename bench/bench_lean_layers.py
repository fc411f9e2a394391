"""The learner's norms and SwiGLU with the lean backward (erpo_fast.lean_layers) vs transformers' own modules.

At a model's shape (bench_vs_trl's MODELS, random weights) and bench_vs_trl's workload (4 prompts x 8 samples of
64 tokens, prompts of 60-200 tokens, micro-batches of 8 sequences): the bytes autograd saves for the largest
micro-batch's forward (storages, parameters excluded, counted as tests/test_memory_plan.py counts them), and the
time of one ``Learner.loss_and_grads`` over the whole step, the two contenders alternated per round on fresh
batches in one process on the same threads. The same learner serves both: ``transformers`` removes the swapped
``forward`` of each module again.

Run: ``python -m bench.bench_lean_layers [--models C D] [--dtypes float32 bfloat16] [--rounds 3] [--tag _x]``
(results: ``bench/results/lean_layers_<models><tag>-cpu.json``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_vs_trl import MODELS, random_model  # noqa: E402
from bench.common import print_table, saved_tensor_bytes, write_results  # noqa: E402
from erpo_fast.cpu_heap import set_cpu_heap  # noqa: E402
from erpo_fast.lean_layers import apply_lean_layers  # noqa: E402

GROUPS, N, RESPONSE, PROMPTS, MICRO_BATCH = 4, 8, 64, (60, 200), 8


def _transformers_modules(model) -> None:
    for module in model.modules():
        vars(module).pop("forward", None)  # the class's own forward again


def _saved_bytes(learner, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    saved, hidden = saved_tensor_bytes(lambda: learner._hidden(learner._policy, batch)[0], exclude=params)
    return saved + hidden.numel() * hidden.element_size()  # + the [N, H] rows the fused loss saves


def case(model: str, dtype: str, rounds: int) -> dict:
    from erpo_fast.batch import RolloutSequence, micro_batches, pack_sequences
    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.learner import Learner

    learner = Learner(random_model(model), AlgorithmConfig(), TrainerConfig(micro_batch_size=MICRO_BATCH),
                      ModelConfig(dtype=dtype), device="cpu", max_len=2048)

    def step(seed):
        rng = random.Random(seed)
        out = []
        for g in range(GROUPS):
            prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(*PROMPTS))]
            out += [RolloutSequence(prompt, [rng.randrange(3, 1000) for _ in range(RESPONSE)], [], 1.0,
                                    rng.gauss(0, 1), g * N + j) for j in range(N)]
        return out

    contenders = {"lean": lambda: apply_lean_layers(learner.model), "transformers":
                  lambda: _transformers_modules(learner.model)}
    # Saved bytes of the largest micro-batch of one step (the same sequences for both).
    seqs = step(-1)
    parts = micro_batches(seqs, max_sequences=MICRO_BATCH, max_tokens=0, share_prompts=True)
    largest = pack_sequences([seqs[i] for i in max(parts, key=lambda idx: sum(len(seqs[i].prompt_ids) + RESPONSE
                                                                          for i in idx))], share_prompts=True)
    saved = {}
    for name, use in contenders.items():
        use()
        saved[name] = _saved_bytes(learner, largest)  # _hidden runs under the learner's autocast
    times = {name: [] for name in contenders}
    learner.loss_and_grads(step(-2))  # warm-up
    for r in range(rounds):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            contenders[name]()
            t0 = time.perf_counter()
            learner.loss_and_grads(step(r))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"model": model, "dtype": dtype, "micro_batch_tokens": int(largest.input_ids.shape[1]),
            "saved_gb_transformers": saved["transformers"] / 1e9, "saved_gb_lean": saved["lean"] / 1e9,
            "saved_ratio": saved["lean"] / saved["transformers"], "transformers_s": med["transformers"],
            "lean_s": med["lean"], "time_ratio": med["lean"] / med["transformers"], "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["C", "D"], choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two contenders")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.exit(2, "bench_lean_layers: --rounds and --threads must be >= 1\n")
    torch.set_num_threads(args.threads)
    set_cpu_heap("release")  # freed activation blocks unmapped, as bench_vs_trl runs the trainer (else RSS balloons)
    rows = [case(m, d, args.rounds) for m in args.models for d in args.dtypes]
    print_table(rows, ["model", "dtype", "micro_batch_tokens", "saved_gb_transformers", "saved_gb_lean",
                       "saved_ratio", "transformers_s", "lean_s", "time_ratio"],
                title=f"Learner.loss_and_grads, {GROUPS} prompts x {N}, micro-batch {MICRO_BATCH}, "
                      f"{args.threads} thread(s)")
    write_results("lean_layers_" + "".join(args.models) + args.tag, {
        "threads": args.threads, "rounds": args.rounds, "models": {m: MODELS[m] for m in args.models},
        "workload": {"prompts": GROUPS, "n": N, "response": RESPONSE, "prompt_tokens": list(PROMPTS),
                     "micro_batch": MICRO_BATCH}, "rows": rows,
        "notes": f"shared 2-core machine; load average {os.getloadavg()} at end"})


if __name__ == "__main__":
    main()
