"""What glibc does with freed CPU blocks of 1-32 MB (``trainer.cpu_heap``): the learner's activations.

Two costs pull apart here, and the memory plan decides between them (`resolve`):

- ``release``: blocks of 1 MB or more get their own mapping, unmapped when freed. The resident peak is then the
  live peak the memory plan predicts. glibc's default instead raises that threshold each time such a block is
  freed (up to 32 MB), after which activation-sized blocks stay resident once freed: measured at SmolLM2-135M's
  shape, the RSS after a learner step stayed 0.7 GB above the live tensors and the peak grew 0.5 GB over the plan
  (bench/NOTES.md). But every step then maps its activations afresh and the kernel faults in and zeroes every
  page: in the default job's loop about 17,000 page faults and 30 ms of system time per learner step.
- ``reuse``: blocks under 32 MB come from the heap and stay there once freed (and the heap's top is not trimmed
  below 256 MB), so later steps reuse warm pages: a few hundred page faults per step, and the default job's
  learner step 6-12% shorter (whole runs side by side, bench/NOTES.md). The resident peak may exceed the plan by
  the heap's fragmentation.

``auto`` takes ``reuse`` when the plan's predicted peak is at most half the memory available (fragmentation
cannot matter there), else ``release``. The weights are always loaded under ``release`` (their big blocks get
their own mappings); the resolved mode applies from the plan on. glibc only: elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes

__all__ = ["RELEASE_THRESHOLD", "REUSE_THRESHOLD", "REUSE_TRIM", "describe", "resolve",
           "set_cpu_heap"]

RELEASE_THRESHOLD = 1 << 20  # release: blocks from 1 MB on get their own mapping
REUSE_THRESHOLD = 32 << 20  # reuse: glibc's largest allowed mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
REUSE_TRIM = 256 << 20  # reuse: free memory kept at the heap's top before glibc gives it back

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def resolve(mode: str, *, peak: int, budget: int | None) -> str:
    """``trainer.cpu_heap`` for a plan that predicts ``peak`` bytes against ``budget`` (None: unknown)."""
    if mode != "auto":
        return mode
    return "reuse" if budget is not None and 2 * peak <= budget else "release"


def describe(setting: str, mode: str) -> str:
    """The memory plan's note for ``trainer.cpu_heap`` = ``setting`` resolved to ``mode``."""
    return (f"freed CPU blocks of 1-32 MB are {'kept for reuse' if mode == 'reuse' else 'unmapped'} "
            f"(trainer.cpu_heap {setting}: {mode})")


def set_cpu_heap(mode: str) -> bool:
    """Apply ``release`` or ``reuse`` (fixed thresholds: glibc's own adjustment stops). Returns whether it applied
    (glibc only)."""
    if mode not in ("release", "reuse"):
        raise ValueError(f"cpu_heap mode must be release or reuse, got {mode!r}")
    try:
        libc = ctypes.CDLL("libc.so.6")
        if mode == "release":
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_THRESHOLD))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, REUSE_TRIM))
    except (OSError, AttributeError):
        return False
