"""The end of a run: the summary printed to the terminal and written to summary.json, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from erpo_fast.logger import read_metrics
from erpo_fast.plots import ascii_histogram, write_plots


def finish(s) -> dict:
    """End-of-run summary (held-out before/after, residual fractions, temperatures) and plots."""
    out = Path(s.cfg.trainer.output_dir)
    summary = {"heldout_before": s.heldout_before, "heldout_after": s.heldout_after, "output_dir": str(out)}
    if not s.rt.is_main:  # (an async run's tracker lives in rank 0's rollout process)
        return summary
    tracker, tracker_ids = s.rollout.tracker, s.rollout.tracker_ids
    temps = tracker.temperatures(tracker_ids)
    seen = tracker.times_seen[tracker_ids] > 0
    summary["temperature_counts"] = tracker.temperature_counts()
    metrics = read_metrics(out)
    plots = write_plots(metrics, out / "plots", temperatures=temps[seen],
                        heldout_before=summary["heldout_before"],
                        heldout_after=summary["heldout_after"]) if s.cfg.logging.plots else []
    summary["plots"] = [str(p) for p in plots]
    summary["residual"] = [{k: m.get(k) for k in ("step", "frac_all_correct", "frac_all_wrong", "frac_mixed")}
                           for m in metrics]
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "residual"},
                                                 indent=2, default=str) + "\n")
    # The run's result, on stdout (progress and logs go to stderr): `train ... > result.txt` keeps it.
    print(format_summary(summary, temps[seen]), flush=True)
    return summary


def format_summary(summary: dict, seen_temps) -> str:
    lines = ["", "=== erpo-fast run summary ==="]
    before, after = summary["heldout_before"], summary["heldout_after"]
    if verdict := heldout_verdict(before, after):
        lines.append(verdict)
    for key in sorted(set(before) | set(after)):
        if key.startswith(("mean_at", "pass_at")):
            lines.append(f"held-out {key:<10s} before {before.get(key, float('nan')):.3f}   "
                         f"after {after.get(key, float('nan')):.3f}")
    res = [r for r in summary["residual"] if r.get("frac_all_correct") is not None]
    if res:
        marks = sorted({0, len(res) // 2, len(res) - 1})
        lines.append("residual prompts (all-correct / all-wrong / mixed):")
        for i in marks:
            r = res[i]
            lines.append(f"  step {r['step']:>5}: {r['frac_all_correct']:.2f} / {r['frac_all_wrong']:.2f} / "
                         f"{r['frac_mixed']:.2f}")
    if len(seen_temps):
        lines.append("per-prompt temperatures (prompts seen so far):")
        lines.append(ascii_histogram(seen_temps, bins=min(10, max(1, len(set(seen_temps.tolist()))))))
    lines.append(f"run directory: {summary['output_dir']}  (metrics.jsonl, checkpoints/, plots/)")
    for p in summary.get("plots", []):
        lines.append(f"  plot: {p}")
    return "\n".join(lines)


def heldout_verdict(before: dict, after: dict) -> str | None:
    """One line: did RL raise held-out accuracy? mean@k at the eval temperature, before -> after (and pass@k).

    A change within +-0.01 is called no change: at the default 200 prompts x 4 samples that is 8 samples."""
    keys = sorted((k for k in before if k.startswith("mean_at_") and k in after),
                  key=lambda k: int(k.removeprefix("mean_at_")))
    if not keys:
        return None
    key = keys[0]
    k = key.removeprefix("mean_at_")
    delta = after[key] - before[key]
    word = "improved" if delta > 0.01 else "lowered" if delta < -0.01 else "did not change"
    line = (f"RL {word} held-out accuracy: mean@{k} {before[key]:.3f} -> {after[key]:.3f} ({delta:+.3f})")
    if f"pass_at_{k}" in before and f"pass_at_{k}" in after:
        line += f", pass@{k} {before[f'pass_at_{k}']:.3f} -> {after[f'pass_at_{k}']:.3f}"
    if before.get("num_prompts"):
        line += f", on {int(before['num_prompts'])} held-out prompts"
    return line
