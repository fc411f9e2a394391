"""Training curves as PNG files, and a text histogram for the terminal summary.

``write_plots`` draws one PNG per panel from ``metrics.jsonl`` records (``PANELS`` lists the keys each
reads) and skips a panel whose keys are all missing or null. Held-out scores of the model before RL (step 0)
come first on their curves, so a reader sees where RL started; per-step series that are noisy (a fraction
of 16 groups) get a running mean drawn over the faded raw line. It uses matplotlib's Agg canvas directly, never
pyplot, so it needs no display and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

# file stem -> (title, y label, exact keys, key prefixes). Sparse series (held-out evals) get markers.
PANELS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "reward": ("Reward", "reward / accuracy", ("reward_mean",), ("heldout_mean_at", "heldout_pass_at")),
    "residuals": ("Residual prompts", "fraction of groups",
                  ("frac_all_correct", "frac_all_wrong", "frac_mixed"), ()),
    "temperature": ("Per-prompt sampling temperature", "temperature",
                    ("temperature_mean", "temperature_max", "temperature_min"), ()),
    "entropy": ("Policy entropy", "nats / token", ("entropy",), ("entropy_",)),
}
TEMPERATURE_HIST = "temperature_hist"
SMOOTH_MIN_POINTS = 20  # shorter series are drawn raw only: a running mean of a few points says nothing new


def running_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start, so the line starts at step 1)."""
    x = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in metrics:
        if _is_number(record.get("step")) and _is_number(record.get(key)):
            steps.append(record["step"])
            values.append(record[key])
    return steps, values


def _panel_keys(metrics: list[dict], exact: tuple[str, ...], prefixes: tuple[str, ...]) -> list[str]:
    keys = list(exact)
    if prefixes:
        for record in metrics:
            keys += [k for k in record if k not in keys and k.startswith(prefixes)]
    return keys


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def with_heldout_ends(metrics: list[dict], before: dict | None, after: dict | None) -> list[dict]:
    """``metrics`` with the evaluations before RL (step 0) and after it (the last step) as held-out records; the
    final one lives in summary.json, not in metrics.jsonl, when the last step was not an evaluation step."""
    metrics = list(metrics)
    if before:
        metrics.insert(0, {"step": 0, **{f"heldout_{k}": v for k, v in before.items()}})
    last = metrics[-1] if metrics else None
    if after and last is not None and _is_number(last.get("step")) and not any(
            k.startswith("heldout_") for k in last):
        metrics.append({"step": last["step"], **{f"heldout_{k}": v for k, v in after.items()}})
    return metrics


def write_plots(metrics: list[dict], out_dir: str | os.PathLike, *,
                temperatures: np.ndarray | None = None, heldout_before: dict | None = None,
                heldout_after: dict | None = None) -> list[Path]:
    """Write the PNG panels that ``metrics`` has data for, and a histogram of ``temperatures`` when given
    (e.g. the final per-prompt temperatures); ``heldout_before`` (the held-out evaluation before RL, keys like
    ``mean_at_4``) becomes the step-0 point of the held-out curves, and ``heldout_after`` (the final evaluation)
    their last point, unless the last step's record has one already. Returns the paths written."""
    if not isinstance(metrics, (list, tuple)) or not all(isinstance(r, dict) for r in metrics):
        raise ValueError("metrics must be a list of dicts (the records of metrics.jsonl)")
    metrics = with_heldout_ends(metrics, heldout_before, heldout_after)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, ylabel, exact, prefixes) in PANELS.items():
        series = {k: _series(metrics, k) for k in _panel_keys(metrics, exact, prefixes)}
        series = {k: sv for k, sv in series.items() if sv[0]}
        if not series:
            continue
        fig = _new_figure()
        ax = fig.add_subplot()
        longest = max(len(s) for s, _ in series.values())
        for key, (steps, values) in series.items():
            sparse = len(steps) < longest or len(steps) == 1
            if sparse or len(steps) < SMOOTH_MIN_POINTS:
                ax.plot(steps, values, marker="o" if sparse else None, markersize=4, label=key)
                continue
            window = max(5, len(steps) // 20)
            (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8, label=f"{key} (per step)")
            ax.plot(steps, running_mean(values, window), color=raw.get_color(), linewidth=2,
                    label=f"{key} (running mean of {window})")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"{stem}.png"))

    if temperatures is not None:
        t = np.asarray(temperatures, dtype=np.float64).ravel()
        t = t[np.isfinite(t)]
        if t.size:
            fig = _new_figure()
            ax = fig.add_subplot()
            values, counts = np.unique(t, return_counts=True)
            if values.size <= 40:  # ERPO raises temperatures in fixed steps: one bar per value reads best
                width = 0.8 * (np.diff(values).min() if values.size > 1 else max(abs(values[0]) * 0.1, 0.1))
                ax.bar(values, counts, width=width, color="tab:orange", edgecolor="black")
            else:
                ax.hist(t, bins=min(40, int(np.sqrt(t.size))), color="tab:orange", edgecolor="black")
            title = f"Final per-prompt temperatures (n={t.size}, mean={t.mean():.3g}, max={t.max():.3g})"
            ax.set(title=title, xlabel="temperature", ylabel="prompts")
            ax.grid(alpha=0.3)
            written.append(_save(fig, out_dir / f"{TEMPERATURE_HIST}.png"))
    return written


def ascii_histogram(values, bins: int = 10, *, width: int = 40) -> str:
    """A text histogram, one line per bin: ``low - high | ##### count``; non-finite values are left out and
    counted in the last line."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    skipped = v.size - finite.size
    note = f" ({skipped} non-finite values left out)" if skipped else ""
    if finite.size == 0:
        return f"(no finite values){note}"
    counts, edges = np.histogram(finite, bins=bins)
    peak = counts.max()
    labels = [(f"{lo:.4g}", f"{hi:.4g}") for lo, hi in zip(edges[:-1], edges[1:])]
    lw, hw = max(len(a) for a, _ in labels), max(len(b) for _, b in labels)
    lines = []
    for (lo, hi), c in zip(labels, counts):
        bar = "#" * (max(1, round(c / peak * width)) if c else 0)
        lines.append(f"{lo:>{lw}} - {hi:<{hw}} | {bar:<{width}} {c}")
    summary = f"n={finite.size} mean={finite.mean():.4g} min={finite.min():.4g} max={finite.max():.4g}"
    lines.append(summary + note)
    return "\n".join(lines)
