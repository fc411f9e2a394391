"""C++/CUDA ops registered through torch.library, compiled on first use and cached.

`load_ops()` builds every `*.cpp` in this folder (plus every `*.cu` when CUDA and a CUDA build of torch
are present, never otherwise) with `torch.utils.cpp_extension.load` and loads the result into the process,
which registers the ops under `torch.ops.erpo_fast`. Building on first use instead of at install time means
pip never needs a second torch inside an isolated build environment.

Build cache (first match wins):
- `$ERPO_FAST_CACHE/torch_extensions`,
- `$TORCH_EXTENSIONS_DIR`,
- `~/.cache/erpo_fast/torch_extensions`.
Builds are keyed by Python, torch and CUDA versions, and torch rebuilds when a source or flag changes.
Needs a C++ compiler and `ninja`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import torch

__all__ = ["load_ops", "ops_available", "cache_dir"]

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "loaded": True, or "error": the exception of a failed build
_log = logging.getLogger(__name__)

CPU_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-DNDEBUG"]
CUDA_FLAGS = ["-O3", "-DNDEBUG"]  # no --use_fast_math: the Gumbel noise needs an accurate logf


def _with_cuda() -> bool:
    if not (torch.cuda.is_available() and torch.version.cuda):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def cache_dir(with_cuda: bool | None = None) -> Path:
    """Build directory for this interpreter/torch/CUDA combination (created on demand)."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    if os.environ.get("ERPO_FAST_CACHE"):
        root = Path(os.environ["ERPO_FAST_CACHE"]) / "torch_extensions"
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    else:
        root = Path.home() / ".cache" / "erpo_fast" / "torch_extensions"
    # A stale .so built against another torch would load and crash, so the key names every ABI input.
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    tag += f"_cu{torch.version.cuda}" if with_cuda else "_cpu"
    return root / tag.replace("+", "_")


def load_ops(verbose: bool = False) -> None:
    """Build (first call only) and load the extension; raises RuntimeError if it cannot be built."""
    with _LOCK:
        if _STATE.get("loaded"):
            return
        if "error" in _STATE:
            raise RuntimeError(f"erpo_fast C++ ops failed to build: {_STATE['error']}") from _STATE["error"]
        from torch.utils.cpp_extension import load

        with_cuda = _with_cuda()
        sources = sorted(str(p) for p in _HERE.glob("*.cpp"))
        if with_cuda:
            sources += sorted(str(p) for p in _HERE.glob("*.cu"))
        build_dir = cache_dir(with_cuda)
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            load(name="erpo_fast_ops_cuda" if with_cuda else "erpo_fast_ops_cpu", sources=sources,
                 extra_cflags=CPU_FLAGS, extra_cuda_cflags=CUDA_FLAGS, extra_include_paths=[str(_HERE)],
                 build_directory=str(build_dir), is_python_module=False, verbose=verbose)
        except Exception as exc:  # compiler missing, ninja missing, compile error: remembered, not retried
            _STATE["error"] = exc
            raise RuntimeError(f"erpo_fast C++ ops failed to build: {exc}") from exc
        _register_fakes()
        _STATE["loaded"] = True


def _register_fakes() -> None:
    """Shape-only implementations so the ops trace under torch.compile / FakeTensor."""

    @torch.library.register_fake("erpo_fast::sample_tokens")
    def _sample_tokens_fake(logits, temperature, top_k, top_p, seed):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)

    @torch.library.register_fake("erpo_fast::sample_tokens_rowseed")
    def _sample_tokens_rowseed_fake(logits, temperature, top_k, top_p, seeds):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)


def ops_available() -> bool:
    """True if the ops are loaded or can be built now; on failure logs one warning and returns False after."""
    if _STATE.get("loaded"):
        return True
    if "error" in _STATE:
        return False
    try:
        load_ops()
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        _log.warning("erpo_fast C++ ops unavailable, using the torch backend (%s); "
                     "erpo_fast.csrc.load_ops(verbose=True) shows the compiler output", first_line)
        return False
    return True
