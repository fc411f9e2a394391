"""LoRA against full fine-tuning: whole default-job runs, and the weight sync of each engine and mode.

``runs``: the embedded default job (preset tiny-cpu, 600 steps, held-out mean@4 every 150 steps), full fine-tuning
against ``model.lora_rank 16`` (alpha 32, lr 1e-3: LoRA's adapters need a larger step than the full model's 1e-4),
each a real ``python -m erpo_fast.train`` command, alternated per seed. Per run: the held-out gain, the loop's
steps/s and the peak RSS of the process tree (bench_async.py's runner). Writes ``bench/results/lora_default-cpu.json``.

``sync``: the weight sync alone at model D's shape (Qwen2.5-0.5B, bench_vs_trl.py; random weights, fp32), timed
as the loop runs it (``Rollout.push_weights``): full fine-tuning into an engine's own copy (all 494M parameters)
against LoRA r=16 sending the merged adapted layers or the adapters, and, for the native engine, the shared
parameters (nothing to copy). Median of ``--repeats`` syncs, contenders alternated. A sync is half the cost: each
mode also times one rollout (16 prompts x 8 samples x 32 tokens, no stop token), since an engine that applies
adapters decodes with their extra matmuls and a merged one without. ``--engine vllm`` runs in
vLLM's environment (``$ERPO_VLLM_PYTHON``). Writes ``bench/results/lora_sync_<engine>_<model>-cpu.json``.

    python bench/bench_lora.py runs --seeds 0 1 2
    python bench/bench_lora.py sync --engine native
    $ERPO_VLLM_PYTHON bench/bench_lora.py sync --engine vllm
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_results  # noqa: E402

LORA_RUN = {"model.lora_rank": 16, "model.lora_alpha": 32, "trainer.lr": 1e-3}
ARMS = {"full": {}, "lora": LORA_RUN}


def bench_runs(seeds: list[int]) -> None:
    from bench.bench_async import job_args, mean_se, run

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        for i, seed in enumerate(seeds):
            for arm in (list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]):
                extra = [a for k, v in ARMS[arm].items() for a in (f"--{k}", str(v))]
                row = run([*job_args("default", seed, None, Path(tmp)), *extra], Path(tmp) / f"{arm}-{seed}")
                row.update(arm=arm, seed=seed)
                rows.append(row)
                print(f"seed {seed} {arm}: gain {row['heldout_gain']:+.3f}, {row['loop_steps_per_s']:.2f} steps/s, "
                      f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    table = []
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        gain, gain_se = mean_se([r["heldout_gain"] for r in mine])
        speed, speed_se = mean_se([r["loop_steps_per_s"] for r in mine])
        table.append({"arm": arm, "heldout_gain": gain, "gain_se": gain_se, "steps_per_s": speed,
                      "steps_per_s_se": speed_se, "peak_rss_gb": max(r["peak_rss_bytes"] for r in mine) / 1e9,
                      "seeds": len(mine)})
    print_table(table, ["arm", "heldout_gain", "gain_se", "steps_per_s", "steps_per_s_se", "peak_rss_gb", "seeds"],
                title="default job: full fine-tuning vs LoRA r=16 (held-out mean@4 gain over the run)")
    write_results("lora_default", {"arms": ARMS, "seeds": seeds, "runs": rows, "summary": table})


def _model_dir(name: str, root: Path) -> Path:
    from bench.bench_vs_trl import build_assets

    return Path(build_assets(name, root, prompts="fixed15")["model_dir"])


ROLLOUT_PROMPTS = [[3 + (7 * i + j) % 500 for j in range(15)] for i in range(16)]


def _time(contenders: dict, repeats: int, times: dict, sizes: dict, rollouts: dict) -> None:
    """Each contender's push ``repeats`` times after one warm-up, alternated; then its rollouts, alternated."""
    for r in range(repeats + 1):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            engine, push = contenders[name]
            t0 = time.perf_counter()
            push()
            if r:
                times.setdefault(name, []).append(time.perf_counter() - t0)
            sizes[name] = engine.last_update_bytes
    for r in range(3):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            engine = contenders[name][0]
            t0 = time.perf_counter()
            engine.generate(ROLLOUT_PROMPTS, [1.0] * len(ROLLOUT_PROMPTS), 8, 32, stop_token_ids=[], seed=r)
            rollouts.setdefault(name, []).append(time.perf_counter() - t0)


def bench_sync(engine_kind: str, repeats: int, rank: int, model_name: str = "D") -> None:
    import torch

    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.engines import make_engine
    from erpo_fast.learner import Learner
    from erpo_fast.lora import add_adapters
    from erpo_fast.models import load_model

    torch.set_num_threads(1)
    lora_cfg = ModelConfig(lora_rank=rank, lora_alpha=2.0 * rank)
    times, sizes, rollouts = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-sync-") as tmp:
        model_dir = _model_dir(model_name, Path(tmp))

        def base():
            return load_model(model_dir, dtype="float32", device="cpu")[0]

        full = Learner(base(), AlgorithmConfig(), TrainerConfig(), ModelConfig(), device="cpu", max_len=64)
        adapted = base()
        add_adapters(adapted, lora_cfg)
        lora = Learner(adapted, AlgorithmConfig(), TrainerConfig(), lora_cfg, device="cpu", max_len=64)

        def push_full(engine):
            return engine, lambda: engine.update_weights(full.named_weights())

        def push_merged(engine):
            return engine, lambda: engine.update_weights(lora.named_weights())

        def push_adapters(engine):
            return engine, lambda: engine.update_adapters(lora.adapter_weights())

        if engine_kind == "native":
            def native(model):
                return make_engine("native", model, device="cpu", dtype=torch.float32)

            _time({"full": push_full(native(copy.deepcopy(full.model))),
                   "lora merged": push_merged(native(base())),
                   "lora adapters": push_adapters(native(copy.deepcopy(lora.model))),
                   "lora adapters, shared": push_adapters(native(lora.model))}, repeats, times, sizes, rollouts)
        else:  # one vLLM engine at a time: the plain one (full, merged), then one serving adapters
            def vllm(**kw):
                return make_engine("vllm", str(model_dir), dtype=torch.float32, max_model_len=256, cpu_threads=1,
                                   enforce_eager=True, **kw)

            plain = vllm()
            _time({"full": push_full(plain), "lora merged": push_merged(plain)}, repeats, times, sizes, rollouts)
            plain.close()
            served = vllm(lora=lora_cfg)
            _time({"lora adapters": push_adapters(served)}, repeats, times, sizes, rollouts)
            served.close()
    base_s = statistics.median(times["full"])
    table = [{"mode": name, "sync_s": statistics.median(t), "vs_full": statistics.median(t) / base_s,
              "bytes": sizes[name], "repeats": len(t), "rollout_s": statistics.median(rollouts[name])}
             for name, t in times.items()]
    print_table(table, ["mode", "sync_s", "vs_full", "bytes", "repeats", "rollout_s"],
                title=f"weight sync at model {model_name} (fp32), {engine_kind} engine, LoRA r={rank} all-linear")
    write_results(f"lora_sync_{engine_kind}_{model_name}", {"model": model_name, "dtype": "float32",
                                               "lora_rank": rank, "threads": 1, "rows": table, "times": times,
                                               "rollout": "16 prompts x 8 samples x 32 tokens", "rollouts": rollouts})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    runs = sub.add_parser("runs")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sync = sub.add_parser("sync")
    sync.add_argument("--engine", choices=("native", "vllm"), default="native")
    sync.add_argument("--repeats", type=int, default=5)
    sync.add_argument("--rank", type=int, default=16)
    sync.add_argument("--model", default="D", choices=("A", "B", "C", "D"), help="a model of bench_vs_trl.py")
    args = ap.parse_args()
    if args.part == "runs":
        bench_runs(args.seeds)
    else:
        bench_sync(args.engine, args.repeats, args.rank, args.model)


if __name__ == "__main__":
    main()
