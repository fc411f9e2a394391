"""Shared benchmark plumbing: timing, peak memory, a printed table, and JSON results with provenance.

Every bench script compares its contenders side by side in one run, prints a table, and writes
`bench/results/<name>-<device>.json` holding the commit, device, shapes and the measured rows.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = _cpu_model()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores" + (f" ({model})" if model else "")


def _cpu_model() -> str:
    """/proc/cpuinfo's model name: this project's CPU machines are not all the same model (AMD EPYC, Intel Xeon)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def saved_tensor_bytes(run: Callable[[], object], exclude: set[int] = frozenset()) -> tuple[int, object]:
    """(bytes of the distinct storages autograd saves for backward while ``run()`` executes, its result).
    ``exclude``: storage data pointers not to count (the parameters')."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def device_slug(device: torch.device | str | None = None) -> str:
    """Short file-name-safe device tag, e.g. `cpu` or `nvidia-h100-80gb-hbm3`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return "cpu"
    return "-".join(device_name(device).lower().replace("_", " ").split())


def synchronize(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3, device=None) -> dict:
    """Median/min wall time of `fn()` in seconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
        synchronize(device)
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": iters}


# --- peak memory -----------------------------------------------------------------------------------
# CUDA: the caching allocator's peak. CPU: the process's resident-set high-water mark (VmHWM), which
# Linux lets us reset through /proc/self/clear_refs, so "extra peak" = HWM during fn - RSS before it.

def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def peak_memory(fn: Callable[[], object], device=None) -> int:
    """Extra peak memory (bytes) used while running `fn()`, above what was in use before it."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _read_status_kb("VmRSS")
    fn()
    return max(0, _read_status_kb("VmHWM") - before)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(name: str, payload: dict, device=None) -> Path:
    """Write `bench/results/<name>-<device>.json` with commit, device and timestamp added."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    path = RESULTS_DIR / f"{name}-{device_slug(device)}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path
