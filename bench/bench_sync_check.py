"""The weight-sync check against reduced-precision noise and against a stale engine, in a real training run (CPU).

The check (``erpo_fast.rollout.check_probe``) compares the engine's log-probs of a probe it sampled with the
learner's. It must pass for a synced engine whatever the precision, and fail for an engine that stopped receiving
the weights. This bench runs the loop of ``python -m erpo_fast.train`` (``build_session`` + ``train_step``, with the
job's own flags; the trainer's own check off) and every ``--every`` steps samples the probe
(``Rollout.sample_probe``, the first ``--prompts`` training prompts) from three engines: the synced one, one never
synced (a copy of the engine taken before step 1) and one whose sync stops at step ``--stop-at`` (a copy taken
then). The learner scores each probe as the check does. For probes of the first k prompts it reports the check's
statistic (``verify_sync``: the mean |d log p| with the 5% largest differences left out) and the plain mean: the
synced engine's median and largest value and the stale engines' medians, and each engine's largest single token;
and per tolerance, how many checks of each engine would fail and from which step (the synced engine must never
fail, the stale ones as early as possible); and the seconds one check takes (the synced engine's probe, sampled
and scored).

Run: ``python -m bench.bench_sync_check [--prompts 32] [--every 10] [--stop-at 300] [--tag T] -- <train flags>``
(e.g. ``-- --model.dtype bfloat16``; results: ``bench/results/sync_check_<dtype>[_<tag>]-cpu.json``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import print_table, write_results  # noqa: E402
from erpo_fast.engines.base import verify_sync  # noqa: E402

PROBE_SIZES = (1, 2, 4, 8, 16, 32)


def probe_sizes(num_prompts: int) -> list[int]:
    """The probe sizes reported for a probe of ``num_prompts`` prompts: the powers of two below it, and itself."""
    return sorted({k for k in PROBE_SIZES if k < num_prompts} | {num_prompts})
TOLERANCES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def probe_statistics(probe: list[list[list[float]]], k: int) -> dict:
    """The probe of the first k prompts: the check's own statistic (``verify_sync``: the mean |engine - learner|
    over the tokens, the 5% that differ most left out), the plain mean over every token, and the largest token."""
    engine = [x for seq in probe[:k] for x in seq[0]]
    learner = [x for seq in probe[:k] for x in seq[1]]
    stats = verify_sync(engine, learner, atol=math.inf)
    return {key: stats[key] for key in ("trimmed_mean_abs_diff", "mean_abs_diff", "max_abs_diff")}


def record(rollout, learner, engines: dict, step: int, num_prompts: int) -> tuple[dict, dict]:
    """Each engine's probe at this step, scored by the learner: per prompt, the two log-prob lists; and the
    seconds each engine's probe took (sampling + scoring: what one check costs)."""
    synced = rollout.engine
    out, seconds = {}, {}
    try:
        for name, engine in engines.items():
            rollout.engine = engine
            t0 = time.perf_counter()
            probe = rollout.sample_probe(step, num_prompts)
            ours = learner.compute_logprobs(probe, temperature=1.0)
            seconds[name] = time.perf_counter() - t0
            out[name] = [[list(seq.rollout_logprobs), lp.tolist()] for seq, lp in zip(probe, ours)]
    finally:
        rollout.engine = synced
    return out, seconds


def summarize(checks: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per probe size and statistic, the synced engine's median and largest value and each stale engine's median;
    and at the largest probe, per tolerance, how many checks of each engine fail and the first step that fails.
    (A stale engine's check at the step its sync stopped is left out: it is still synced then.)"""
    sizes = sorted(set.intersection(*({int(k) for k in v} for c in checks for v in c["stats"].values())))
    largest = str(sizes[-1])
    by_size, by_tolerance = [], []
    for k in sizes:
        for stat in ("trimmed_mean_abs_diff", "mean_abs_diff"):
            row = {"prompts": k, "statistic": stat}
            for name in checks[-1]["stats"]:
                values = [c["stats"][name][str(k)][stat] for c in checks if name in c["stats"]]
                row[f"{name}_median"] = float(torch.tensor(values).median())
                if name == "synced":
                    row["synced_max"] = max(values)
            by_size.append(row)
    row = {"prompts": sizes[-1], "statistic": "max_abs_diff"}  # the largest single token, over every check
    for name in checks[-1]["stats"]:
        row[f"{name}_max"] = max(c["stats"][name][largest]["max_abs_diff"] for c in checks if name in c["stats"])
    by_size.append(row)
    for stat in ("trimmed_mean_abs_diff", "mean_abs_diff"):
        for atol in TOLERANCES:
            row = {"prompts": sizes[-1], "statistic": stat, "atol": atol}
            for name in checks[-1]["stats"]:
                fails = [c["step"] for c in checks if name in c["stats"] and c["stats"][name][largest][stat] > atol]
                row[f"{name}_fails"] = f"{len(fails)}/{sum(name in c['stats'] for c in checks)}"
                row[f"{name}_first"] = fails[0] if fails else None
            by_tolerance.append(row)
    return by_size, by_tolerance


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="probe prompts recorded per check (the largest k)")
    ap.add_argument("--every", type=int, default=10, help="steps between probes")
    ap.add_argument("--stop-at", type=int, default=300, help="step after which the third engine gets no sync")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(ours)

    import logging

    from erpo_fast.config import config_from_cli
    from erpo_fast.distributed import init_runtime, shutdown
    from erpo_fast.run_dir import prepare_run
    from erpo_fast.session import build_session
    from erpo_fast.train import train_step

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    out_dir = tempfile.mkdtemp(prefix="bench_sync_")
    cfg = config_from_cli([*train_flags, "--trainer.output_dir", out_dir, "--rollout.sync_check_every", "0",
                           "--trainer.save_every", "0", "--trainer.eval_every", "0"])
    if cfg.trainer.async_steps or cfg.rollout.engine != "native":
        raise SystemExit("bench_sync_check: the synchronous loop with the native engine only")
    rt = init_runtime(cfg.trainer.device)
    lock = prepare_run(cfg, rt)
    s = build_session(cfg, rt)
    engines = {"synced": s.rollout.engine, "never_synced": copy.deepcopy(s.rollout.engine)}
    checks, t0 = [], time.perf_counter()
    try:
        for step in range(1, cfg.trainer.max_steps + 1):
            train_step(s, step, None)
            if step == args.stop_at:
                engines[f"stopped_at_{step}"] = copy.deepcopy(s.rollout.engine)
            if step % args.every == 0:
                probes, seconds = record(s.rollout, s.learner, engines, step, args.prompts)
                stats = {name: {str(k): probe_statistics(p, k) for k in probe_sizes(len(p))}
                         for name, p in probes.items() if not name.endswith(f"_{step}")}
                checks.append({"step": step, "stats": stats, "check_seconds": seconds["synced"]})
                print(f"step {step}: the check's statistic, {args.prompts} prompts: " + ", ".join(
                    f"{name} {v[str(min(args.prompts, len(probes[name])))]['trimmed_mean_abs_diff']:.4f}"
                    for name, v in stats.items()) + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
        s.close()
        lock.release()
        shutdown(rt)

    by_size, by_tolerance = summarize(checks)
    dtype = str(s.learner.compute_dtype).removeprefix("torch.")
    tokens = min(16, cfg.rollout.max_new_tokens)
    stale = [f"{e}_{x}" for e in engines if e != "synced" for x in ("median", "max")]
    print_table(by_size, ["prompts", "statistic", "synced_median", "synced_max", *stale],
                title=f"sync statistics, {dtype} learner, up to {tokens} tokens per prompt, {len(checks)} checks")
    print_table(by_tolerance, ["prompts", "statistic", "atol"] + [
        f"{e}_{x}" for e in engines for x in ("fails", "first")], title="checks that fail, per tolerance")
    check_seconds = float(torch.tensor([c["check_seconds"] for c in checks]).median())
    print(f"one check (sample the {args.prompts}-prompt probe, score it): median {check_seconds:.2f} s "
          f"on {torch.get_num_threads()} threads")
    write_results(f"sync_check_{dtype}" + (f"_{args.tag}" if args.tag else ""), {
        "train_flags": train_flags, "settings": vars(args), "max_steps": cfg.trainer.max_steps,
        "probe_tokens_per_prompt": tokens, "engines": list(engines), "threads": torch.get_num_threads(),
        "check_seconds_median": check_seconds, "by_size": by_size,
        "by_tolerance": by_tolerance, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
