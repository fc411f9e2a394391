"""ERPO against GRPO and DAPO on the embedded default task, at equal rollout budget, over several seeds.

    python -m bench.erpo_vs_baselines              # the full comparison (4 arms x 5 seeds)
    python -m bench.erpo_vs_baselines --quick      # a few steps per arm, 1 seed: checks the pipeline end to end

Arms (config overrides on the tiny-cpu preset, which also picks the task: ``builtin.task``; everything else is
identical):

- ``grpo``: plain GRPO: no dynamic sampling, symmetric clip (0.2/0.2), per-sequence-then-token loss mean.
- ``dapo``: dynamic sampling, clip-higher (0.2/0.28), token-mean loss.
- ``erpo``: ``dapo`` plus ERPO's adaptive per-prompt temperature.
- ``erpo_ra``: ``erpo`` plus RA (a virtual negative response in all-correct groups).

Equal budget: same prompts per step, same n, same number of steps, same warm-started model. Dynamic sampling
runs with ``algorithm.max_refill_rounds 0``: it drops zero-advantage groups but never rolls out extra prompts,
so every arm samples exactly ``steps x prompts_per_step x n`` responses.

Seeds: seed s sets ``trainer.seed`` (prompt order and sampling) and ``builtin.seed`` (the task split and the warm
start), so each seed has its own warm start and the error bars include warm-start variance. ``--data-seed N``
instead shares one split and warm start between all seeds. Within a seed, all four arms start from the same
model, so differences between arms are paired by seed.

Held-out evaluation is done here, not by the trainer: every saved checkpoint (and the seed's starting model) is
sampled 16 times per held-out prompt with one fixed seed, so every arm is scored on the same random numbers,
and mean@k / pass@k for k = 4 and 16 come from the same 16 samples (unbiased pass@k estimator).

Results are cached per run in the work directory (``<arm>_seed<s>/record.json``, ``base_seed<s>.json``, keyed by
the overrides), so a stopped comparison continues where it stopped when started again with the same arguments.

Writes ``<out-dir>/erpo_vs_baselines.json``, ``.md`` (the table) and ``erpo_vs_baselines_*.png`` (curves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, device_name, git_commit, print_table

NAME = "erpo_vs_baselines"
ARMS: dict[str, dict[str, object]] = {
    "grpo": {"algorithm.erpo": False, "algorithm.dynamic_sampling": False, "algorithm.eps_low": 0.2,
             "algorithm.eps_high": 0.2, "algorithm.loss_agg": "seq_mean_token_mean", "algorithm.ra": False},
    "dapo": {"algorithm.erpo": False, "algorithm.dynamic_sampling": True, "algorithm.eps_low": 0.2,
             "algorithm.eps_high": 0.28, "algorithm.loss_agg": "token_mean", "algorithm.ra": False},
    "erpo": {"algorithm.erpo": True, "algorithm.dynamic_sampling": True, "algorithm.eps_low": 0.2,
             "algorithm.eps_high": 0.28, "algorithm.loss_agg": "token_mean", "algorithm.ra": False},
    "erpo_ra": {"algorithm.erpo": True, "algorithm.dynamic_sampling": True, "algorithm.eps_low": 0.2,
                "algorithm.eps_high": 0.28, "algorithm.loss_agg": "token_mean", "algorithm.ra": True},
}
KS = (4, 16)
EVAL_SEED = 20251  # one seed for every evaluation: arms are compared on common random numbers
NO_SIGNAL_START = 0.05  # held-out mean@4 of a starting model below which its seed is reported apart
STEP_KEYS = ("reward_mean", "frac_all_correct", "frac_all_wrong", "frac_mixed", "revived", "temperature_mean",
             "temperature_max", "entropy", "time_step_s", "groups_dropped", "sequences_trained")

# Scale of the two modes. The full one takes the preset's task, model and budget (steps, prompts per step, n,
# split sizes, warm start) and adds seeds; the quick one only has to exercise every code path in minutes.
FULL = {"seeds": 5, "eval_every": 100}
QUICK = {"seeds": 1, "steps": 4, "prompts_per_step": 8, "n": 8, "eval_every": 2, "num_train": 64,
         "num_heldout": 16, "warm_start_steps": 300}
PRESET = "tiny-cpu"


def resolve_scale(scale: dict) -> dict:
    """Fill what the scale leaves open from the preset, so the report states every figure of the budget."""
    from erpo_fast.config import build_config

    cfg = build_config(PRESET, None, {})
    preset = {"steps": cfg.trainer.max_steps, "prompts_per_step": cfg.trainer.prompts_per_step, "n": cfg.rollout.n,
              "num_train": cfg.builtin.num_train, "num_heldout": cfg.builtin.num_heldout,
              "warm_start_steps": cfg.builtin.warm_start_steps}
    return {**preset, **scale, "task": cfg.builtin.task, "task_levels": cfg.builtin.levels}


def base_overrides(scale: dict, data_seed: int) -> dict[str, object]:
    """Overrides shared by every arm of one seed (the equal-budget part of the comparison)."""
    return {
        "builtin.seed": data_seed, "builtin.num_train": scale["num_train"],
        "builtin.num_heldout": scale["num_heldout"],
        "data.reward_workers": 0,  # exact integer checks: in-process scoring keeps worker processes off 2 cores
        "builtin.warm_start_steps": scale["warm_start_steps"],
        "rollout.n": scale["n"], "trainer.prompts_per_step": scale["prompts_per_step"],
        "trainer.max_steps": scale["steps"], "algorithm.max_refill_rounds": 0,
        "trainer.eval_every": 0,  # evaluated here from checkpoints, with k = 4 and 16 and a shared seed
        "trainer.save_every": scale["eval_every"], "trainer.keep_last": scale["steps"],
        "logging.progress": False, "logging.plots": False,
    }


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path, key: str) -> dict | None:
    """The record a previous (possibly stopped) comparison saved at `path`, if it was made with `key`."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["record"] if saved.get("key") == key else None


def save_cached(path: Path, key: str, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "record": record}, default=float))
    os.replace(tmp, path)  # atomic: a comparison killed mid-write leaves the old record or none


# --- one run (executed in a worker process) --------------------------------------------------------------

def run_job(arm: str, seed: int, overrides: dict, out_dir: str, threads: int) -> dict:
    """Train one (arm, seed), then evaluate each of its checkpoints; returns the per-seed record."""
    import torch

    from erpo_fast.config import build_config
    from erpo_fast.logger import read_metrics
    from erpo_fast.train import train

    torch.set_num_threads(threads)
    cfg = build_config(PRESET, None, {**overrides, **ARMS[arm], "trainer.seed": seed,
                                          "trainer.output_dir": out_dir, "trainer.threads": threads,
                                          "trainer.overwrite": True})  # a rerun replaces the arm's old run
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    metrics = read_metrics(out_dir)
    curve = []
    for step, model_dir in _checkpoint_models(Path(out_dir)):
        curve.append({"step": step, **evaluate_model(model_dir, cfg)})
    steps = {k: [m.get(k) for m in metrics] for k in ("step", *STEP_KEYS)}
    return {"seed": seed, "train_wall_s": train_s, "steps": steps, "heldout_curve": curve,
            "heldout_final": curve[-1] if curve else {},
            "temperature_counts": {str(k): int(v) for k, v in summary.get("temperature_counts", {}).items()}}


def _checkpoint_models(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for d in sorted((out_dir / "checkpoints").glob("step_*")):
        if (d / "COMPLETE").is_file():
            found.append((int(d.name.split("_")[1]), d / "model"))
    return found


def evaluate_model(model_dir: Path, cfg) -> dict:
    """mean@k / pass@k (k = 4, 16) of a saved model on the built-in task's held-out split, with the shared seed."""
    from erpo_fast.data import problem_records
    from erpo_fast.engines import make_engine
    from erpo_fast.evaluate import evaluate
    from erpo_fast.models import load_model
    from erpo_fast.rewards import get_reward_fn
    from erpo_fast.rewards.pool import RewardPool
    from erpo_fast.tasks import builtin

    heldout = problem_records(builtin.splits(cfg.builtin)[1])
    model, tokenizer = load_model(model_dir, dtype="float32", attn_implementation="sdpa", device="cpu")
    engine = make_engine("native", model)
    with RewardPool(get_reward_fn(builtin.reward_name(cfg.builtin)), num_workers=0) as pool:
        out = evaluate(engine, tokenizer, heldout, reward_pool=pool, ks=KS, temperature=1.0,
                       max_new_tokens=cfg.rollout.max_new_tokens, seed=EVAL_SEED,
                       chat_template=cfg.data.chat_template)
    return {k: v for k, v in out.items() if k.startswith(("mean_at", "pass_at"))}


def _job_entry(args: tuple) -> tuple[str, int, dict]:
    arm, seed, overrides, out_dir, threads, key = args
    # Worker processes print only a line per run; the trainer's own summary goes to its run directory.
    sys.stderr = open(Path(out_dir).parent / f"{Path(out_dir).name}.log", "w")  # noqa: SIM115
    record = run_job(arm, seed, overrides, out_dir, threads)
    save_cached(Path(out_dir).parent / f"{Path(out_dir).name}.json", key, record)
    return arm, seed, record


def base_model_eval(overrides: dict, threads: int) -> dict:
    """Build (or reuse) the seed's warm start and evaluate it: the step-0 point of every arm of that seed."""
    import torch

    from erpo_fast.config import build_config
    from erpo_fast.warm_start import builtin_model_for

    torch.set_num_threads(threads)
    cfg = build_config(PRESET, None, overrides)
    t0 = time.perf_counter()
    model_dir = builtin_model_for(cfg)  # the trainer's own warm-start cache, so the runs reuse it
    warm_s = time.perf_counter() - t0
    return {"heldout": {"step": 0, **evaluate_model(model_dir, cfg)}, "warm_start_s": warm_s}


def _base_entry(args: tuple) -> tuple[int, dict]:
    seed, overrides, threads, path, key = args
    record = base_model_eval(overrides, threads)
    save_cached(Path(path), key, record)
    return seed, record


# --- aggregation -----------------------------------------------------------------------------------------

def mean_stderr(values) -> tuple[float | None, float | None]:
    """Mean and standard error over seeds (stderr None with a single seed: no spread to estimate; both None
    when no seed has the quantity, e.g. entropy when dynamic sampling dropped every group)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None, None
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def _steps_array(seeds: list[dict], key: str) -> np.ndarray:
    """[seeds, steps] of one per-step metric (NaN where the trainer logged null)."""
    return np.asarray([[np.nan if v is None else v for v in s["steps"][key]] for s in seeds], dtype=np.float64)


def summarize_arm(seeds: list[dict], window: int) -> dict:
    """The arm's summary over seeds: end-of-training held-out scores, residual fractions, ERPO activity, time."""
    out: dict[str, object] = {"num_seeds": len(seeds)}
    for stat in ("mean", "pass"):
        vals, errs = {}, {}
        for k in KS:
            m, s = mean_stderr([sd["heldout_final"].get(f"{stat}_at_{k}") for sd in seeds])
            vals[str(k)], errs[str(k)] = m, s
        out[f"heldout_{stat}_at_k"], out[f"heldout_{stat}_at_k_stderr"] = vals, errs
        gains, gain_errs = {}, {}
        for k in KS:  # after RL minus the seed's own starting model: what RL added
            key = f"{stat}_at_{k}"
            m, e = mean_stderr([sd["heldout_final"][key] - sd["heldout_before"][key] for sd in seeds
                                if key in sd["heldout_final"] and key in sd.get("heldout_before", {})])
            gains[str(k)], gain_errs[str(k)] = m, e
        out[f"heldout_{stat}_at_k_gain"], out[f"heldout_{stat}_at_k_gain_stderr"] = gains, gain_errs
    ac, aw = _steps_array(seeds, "frac_all_correct"), _steps_array(seeds, "frac_all_wrong")
    per_seed_residual = np.nanmean(ac + aw, axis=1)
    out["frac_residual_mean"], out["frac_residual_mean_stderr"] = mean_stderr(per_seed_residual)
    # Does the all-correct fraction grow? First vs last `window` steps, per seed.
    out["frac_all_correct_first"], _ = mean_stderr(np.nanmean(ac[:, :window], axis=1))
    out["frac_all_correct_last"], out["frac_all_correct_last_stderr"] = mean_stderr(np.nanmean(ac[:, -window:],
                                                                                              axis=1))
    out["frac_all_wrong_last"], _ = mean_stderr(np.nanmean(aw[:, -window:], axis=1))
    out["revived_per_step"], out["revived_per_step_stderr"] = mean_stderr(
        np.nanmean(_steps_array(seeds, "revived"), axis=1))
    out["temperature_mean"], _ = mean_stderr(np.nanmean(_steps_array(seeds, "temperature_mean"), axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a seed with no trained group logs no entropy
        out["entropy_last"], _ = mean_stderr(np.nanmean(_steps_array(seeds, "entropy")[:, -window:], axis=1))
    out["sequences_trained_per_step"], _ = mean_stderr(
        np.nanmean(_steps_array(seeds, "sequences_trained"), axis=1))
    out["step_time_s"], out["step_time_s_stderr"] = mean_stderr(
        np.nanmedian(_steps_array(seeds, "time_step_s"), axis=1))
    counts: dict[str, int] = {}
    for sd in seeds:
        for t, c in sd["temperature_counts"].items():
            counts[t] = counts.get(t, 0) + c
    out["final_temperature_counts"] = dict(sorted(counts.items(), key=lambda kv: float(kv[0])))
    return out


PAIRED_KEYS = tuple(f"{stat}_at_{k}" for k in KS for stat in ("mean", "pass"))


def paired_differences(arms: dict, baseline: str) -> dict:
    """Per-seed differences to the baseline arm (same seed = same warm start, prompt order and eval samples):
    mean and stderr over seeds, for held-out mean@k / pass@k and the ratio of median step times."""
    out = {}
    base = {sd["seed"]: sd for sd in arms[baseline]["seeds"]}
    for name, arm in arms.items():
        if name == baseline:
            continue
        pairs = [(sd, base[sd["seed"]]) for sd in arm["seeds"] if sd["seed"] in base]
        row = {}
        for key in PAIRED_KEYS:
            m, s = mean_stderr([sd["heldout_final"][key] - b["heldout_final"][key] for sd, b in pairs])
            row[key] = {"mean": m, "stderr": s}
        m, s = mean_stderr([np.median(sd["steps"]["time_step_s"]) / np.median(b["steps"]["time_step_s"])
                            for sd, b in pairs])
        row["step_time_ratio"] = {"mean": m, "stderr": s}
        row["num_pairs"] = len(pairs)
        out[name] = row
    return out


# --- report ----------------------------------------------------------------------------------------------

def _pm(m: float | None, s: float | None, digits: int = 3) -> str:
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def table_rows(result: dict, arms: dict | None = None) -> list[dict]:
    rows = []
    for name, arm in (arms or result["arms"]).items():
        s = arm["summary"]
        rows.append({
            "arm": name,
            "mean@4": _pm(s["heldout_mean_at_k"]["4"], s["heldout_mean_at_k_stderr"]["4"]),
            "Δ mean@4 vs start": _pm(s["heldout_mean_at_k_gain"]["4"], s["heldout_mean_at_k_gain_stderr"]["4"]),
            "mean@16": _pm(s["heldout_mean_at_k"]["16"], s["heldout_mean_at_k_stderr"]["16"]),
            "pass@4": _pm(s["heldout_pass_at_k"]["4"], s["heldout_pass_at_k_stderr"]["4"]),
            "pass@16": _pm(s["heldout_pass_at_k"]["16"], s["heldout_pass_at_k_stderr"]["16"]),
            "residual frac": _pm(s["frac_residual_mean"], s["frac_residual_mean_stderr"]),
            "all-correct first→last": f"{_pm(s['frac_all_correct_first'], None)} → "
                                      f"{_pm(s['frac_all_correct_last'], s['frac_all_correct_last_stderr'])}",
            "revived/step": _pm(s["revived_per_step"], s["revived_per_step_stderr"], 2),
            "mean T": _pm(s["temperature_mean"], None),
            "seqs trained/step": _pm(s["sequences_trained_per_step"], None, 1),
            "entropy (last)": _pm(s["entropy_last"], None),
            "step time (s)": _pm(s["step_time_s"], s["step_time_s_stderr"]),
        })
    return rows


def markdown(result: dict) -> str:
    rows = table_rows(result)
    cols = list(rows[0])
    cfg = result["config"]
    before = result["heldout_before"]
    shared = "one shared warm start" if cfg.get("data_seed") is not None else "each seed its own warm start"
    lines = [f"# ERPO vs baselines ({'quick' if cfg['quick'] else 'full'} run)", "",
             f"Built-in task `{cfg.get('task', 'arithmetic')}` (levels {cfg.get('task_levels') or 'default'}), "
             f"tiny Qwen2 (warm-started; {shared}), {cfg['seeds']} seed(s) per arm, "
             f"{cfg['steps']} steps x {cfg['prompts_per_step']} prompts x n={cfg['n']} per arm and seed "
             f"(equal rollout budget, no refill). Held-out: {cfg['num_heldout']} prompts x 16 samples at T=1 "
             f"after the last step. Values are mean ± standard error over seeds; 'all-correct first→last' "
             f"averages the first and last {cfg['window']} steps.", "",
             f"Held-out before RL (starting models, mean over seeds): mean@4 {before['mean_at_4']:.3f}, "
             f"mean@16 {before['mean_at_16']:.3f}, pass@4 {before['pass_at_4']:.3f}, "
             f"pass@16 {before['pass_at_16']:.3f}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += _paired_tables(result)
    if working := result.get("with_signal"):
        lines += ["", f"### Only the seeds whose warm start worked ({len(working['seeds'])} of {cfg['seeds']}: "
                  f"seeds {', '.join(map(str, result['seeds_without_signal']))} started below held-out mean@4 "
                  f"{NO_SIGNAL_START}, so no arm had anything to learn from)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in table_rows(result, working["arms"])]
        lines += _paired_tables(working)
    lines += ["", "'revived' counts mixed groups of prompts whose tracker temperature was above base. The tracker "
              "runs in every arm, but only erpo/erpo_ra sample at its temperature: in grpo/dapo the count is the "
              "T=1 counterfactual (prompts ERPO would have heated that came back mixed anyway). 'step time' is "
              "the median wall time of a step (rollout + learn + sync); arms with dynamic sampling train on fewer "
              "sequences per step (the dropped groups), so erpo's step time ratio to dapo is ERPO's own "
              "overhead.", "",
              "Final per-prompt temperatures of the tracker (prompts seen, summed over seeds; in grpo/dapo these "
              "were never used for sampling):", ""]
    for name, arm in result["arms"].items():
        counts = arm["summary"]["final_temperature_counts"]
        lines.append(f"- {name}: " + ", ".join(f"T={float(t):.1f}: {c}" for t, c in counts.items()))
    return "\n".join(lines) + "\n"


def _paired_tables(result: dict) -> list[str]:
    lines = []
    for baseline in ("grpo", "dapo"):
        paired = result.get(f"paired_vs_{baseline}")
        if not paired:
            continue
        lines += ["", f"Paired difference to {baseline} (same seed), mean ± stderr over seeds:", "",
                  "| arm | Δ mean@4 | Δ mean@16 | Δ pass@4 | Δ pass@16 | step time ratio |",
                  "|---|---|---|---|---|---|"]
        for name, d in paired.items():
            lines.append(f"| {name} | " + " | ".join(_pm(d[k]["mean"], d[k]["stderr"]) for k in
                                                      ("mean_at_4", "mean_at_16", "pass_at_4", "pass_at_16",
                                                       "step_time_ratio")) + " |")
    return lines


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """Held-out accuracy, residual fractions and entropy over steps: one line per arm, min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:red", "tab:green")))

    def band(ax, x, ys, name, smooth=1):
        ys = np.asarray(ys, dtype=np.float64)
        if smooth > 1:  # a running mean: per-step fractions over 16 groups are very noisy
            kernel = np.ones(smooth) / smooth
            ys = np.stack([np.convolve(y, kernel, mode="valid") for y in ys])
            x = np.asarray(x)[smooth - 1:]
        if np.isnan(ys).all():  # e.g. entropy when every group was dropped: nothing to draw
            return
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a step with no trained group)
            mid, lo, hi = np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
        ax.plot(x, mid, color=colors[name], label=name)
        if len(ys) > 1:
            ax.fill_between(x, lo, hi, color=colors[name], alpha=0.2)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("mean_at_4", "pass_at_4", "pass_at_16")):
        for name, arm in result["arms"].items():
            x = [0] + [p["step"] for p in arm["seeds"][0]["heldout_curve"]]
            ys = [[sd["heldout_before"][key]] + [p[key] for p in sd["heldout_curve"]] for sd in arm["seeds"]]
            band(ax, x, ys, name)
        ax.set(title=f"held-out {key.replace('_at_', '@')}", xlabel="step")
        ax.legend()
    paths.append(_save(fig, out_dir / f"{NAME}_heldout.png"))

    smooth = result["config"]["window"]
    for keys, suffix in ((("frac_all_correct", "frac_all_wrong", "frac_mixed"), "residual"),
                         (("entropy", "temperature_mean", "revived"), "entropy_temperature")):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, key in zip(axes, keys):
            for name, arm in result["arms"].items():
                x = arm["seeds"][0]["steps"]["step"]
                band(ax, x, _steps_array(arm["seeds"], key), name, smooth=min(smooth, len(x)))
            ax.set(title=f"{key} (running mean of {smooth} steps)", xlabel="step")
            ax.legend()
        paths.append(_save(fig, out_dir / f"{NAME}_{suffix}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- driver ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.erpo_vs_baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps, a tiny held-out set")
    parser.add_argument("--seeds", type=int, help="seeds per arm (0..S-1)")
    parser.add_argument("--seed-list", type=int, nargs="+", help="run these seeds instead of 0..S-1 (e.g. to add "
                        "or redo one seed; merge the JSONs by hand)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--eval-every", type=int, help="held-out evaluation every K steps")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--data-seed", type=int, default=None,
                        help="share this task split and warm start between all seeds (default: seed s uses "
                             "builtin.seed s, its own warm start)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with threads/jobs threads)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON, Markdown and PNGs go")
    parser.add_argument("--work-dir", default="runs/erpo_vs_baselines",
                        help="run directories and the per-run cache (not results)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the summaries, table and plots from <out-dir>/erpo_vs_baselines.json")
    args = parser.parse_args(argv)
    if args.report_only:
        return report(Path(args.out_dir), json.loads((Path(args.out_dir) / f"{NAME}.json").read_text()))
    scale = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "steps", "eval_every"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    scale = resolve_scale(scale)
    if scale["seeds"] < 1 or scale["steps"] < 1 or scale["eval_every"] < 1 or args.jobs < 1 or args.threads < 1:
        parser.error("--seeds, --steps, --eval-every, --jobs and --threads must be >= 1")
    if "grpo" not in args.arms:
        parser.error("--arms must include grpo (the baseline of the paired differences)")
    window = max(1, min(20, scale["steps"] // 4))
    out_dir, work = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    seeds = sorted(set(args.seed_list)) if args.seed_list else list(range(scale["seeds"]))
    scale["seeds"] = len(seeds)
    overrides = {seed: {**base_overrides(scale, seed if args.data_seed is None else args.data_seed),
                        "trainer.seed": seed} for seed in seeds}
    load_before = os.getloadavg()
    per_job_threads = max(1, args.threads // args.jobs)
    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pools or numba state shared by forks

    # A cached run counts only if made with the same preset values (a changed preset makes every run stale).
    from erpo_fast.config import build_config

    preset_values = build_config(PRESET, None, {}).to_dict()
    # Step 0 of each seed: its warm start (the trainer's cache) and the held-out score of that starting model.
    bases: dict[int, dict] = {}
    base_jobs = []
    for seed in seeds:
        key = cache_key(preset_values, "base", overrides[seed], EVAL_SEED)
        path = work / f"base_seed{seed}.json"
        if (hit := cached(path, key)) is not None:
            bases[seed] = hit
        else:
            base_jobs.append((seed, overrides[seed], per_job_threads, str(path), key))
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for seed, record in pool.imap_unordered(_base_entry, base_jobs):
            bases[seed] = record
            print(f"starting model seed {seed} (warm start {record['warm_start_s']:.0f}s): {record['heldout']}",
                  flush=True)

    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    jobs = []
    for seed in seeds:
        for arm in args.arms:
            key = cache_key(preset_values, arm, ARMS[arm], overrides[seed], EVAL_SEED)
            run_dir = work / f"{arm}_seed{seed}"
            if (hit := cached(work / f"{run_dir.name}.json", key)) is not None:
                results[arm][seed] = hit
            else:
                jobs.append((arm, seed, overrides[seed], str(run_dir), per_job_threads, key))
    done = sum(len(r) for r in results.values())
    if done:
        print(f"{done} run(s) reused from {work} (cached by an earlier, possibly stopped, comparison)", flush=True)
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for arm, seed, record in pool.imap_unordered(_job_entry, jobs):
            results[arm][seed] = record
            f = record["heldout_final"]
            print(f"{arm:8s} seed {seed}: train {record['train_wall_s']:.0f}s, held-out mean@4 "
                  f"{bases[seed]['heldout']['mean_at_4']:.3f} -> {f.get('mean_at_4', float('nan')):.3f}, pass@16 "
                  f"{f.get('pass_at_16', float('nan')):.3f} ({time.perf_counter() - t_start:.0f}s elapsed)",
                  flush=True)
    wall = time.perf_counter() - t_start

    arms = {arm: {"seeds": [{**results[arm][s], "heldout_before": bases[s]["heldout"]} for s in sorted(results[arm])]}
            for arm in args.arms}
    before = {k: float(np.mean([bases[s]["heldout"][k] for s in seeds])) for k in PAIRED_KEYS}
    result = {
        "name": NAME, "commit": git_commit(), "device": device_name("cpu"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"quick": args.quick, **scale, "arms": {a: ARMS[a] for a in args.arms},
                   "shared_overrides": overrides[seeds[0]], "data_seed": args.data_seed, "preset": PRESET,
                   "ks": list(KS), "eval_seed": EVAL_SEED, "eval_temperature": 1.0, "window": window,
                   "jobs": args.jobs, "threads_per_job": per_job_threads,
                   "rollout_budget_per_run": scale["steps"] * scale["prompts_per_step"] * scale["n"]},
        "heldout_before": before, "heldout_before_per_seed": {str(s): bases[s]["heldout"] for s in seeds},
        "warm_start_s": {str(s): bases[s]["warm_start_s"] for s in seeds}, "wall_s": wall,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "arms": arms,
    }
    return report(out_dir, result)


def report(out_dir: Path, result: dict) -> int:
    """Summaries over seeds, paired differences, then the JSON, the Markdown table and the plots."""
    for arm in result["arms"].values():
        arm["summary"] = summarize_arm(arm["seeds"], result["config"]["window"])
    for baseline in ("grpo", "dapo"):
        if baseline in result["arms"]:
            result[f"paired_vs_{baseline}"] = paired_differences(result["arms"], baseline)
    # A seed whose warm start failed (e.g. never left the loss plateau) gives every arm zero signal; the report
    # shows the comparison without such seeds too. The rule looks only at the starting model, never at RL.
    starts = {int(s): b["mean_at_4"] for s, b in result["heldout_before_per_seed"].items()}
    result["seeds_without_signal"] = sorted(s for s, m in starts.items() if m < NO_SIGNAL_START)
    result.pop("with_signal", None)
    if result["seeds_without_signal"] and len(result["seeds_without_signal"]) < len(starts):
        keep = {s for s, m in starts.items() if m >= NO_SIGNAL_START}
        arms = {name: {"seeds": [sd for sd in arm["seeds"] if sd["seed"] in keep]}
                for name, arm in result["arms"].items()}
        for arm in arms.values():
            arm["summary"] = summarize_arm(arm["seeds"], result["config"]["window"])
        working = {"seeds": sorted(keep), "arms": {n: {"summary": a["summary"]} for n, a in arms.items()}}
        for baseline in ("grpo", "dapo"):
            if baseline in arms:
                working[f"paired_vs_{baseline}"] = paired_differences(arms, baseline)
        result["with_signal"] = working
    (out_dir / f"{NAME}.json").write_text(json.dumps(result, separators=(",", ":"), default=float) + "\n")
    (out_dir / f"{NAME}.md").write_text(markdown(result))
    plots = write_plots(result, out_dir)
    rows = table_rows(result)
    print_table(rows, list(rows[0]), title=f"{NAME} ({result['wall_s']:.0f}s)")
    print(f"\nwrote {out_dir / (NAME + '.json')}, {out_dir / (NAME + '.md')}, " + ", ".join(map(str, plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
