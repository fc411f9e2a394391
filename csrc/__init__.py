"""C++/CUDA ops registered through torch.library, compiled on first use and cached.

`load_ops()` builds every `*.cpp` in this folder (plus every `*.cu` when CUDA and a CUDA build of torch
are present, never otherwise) with `torch.utils.cpp_extension.load` and loads the result into the process,
which registers the ops under `torch.ops.erpo_fast`. Building on first use instead of at install time means
pip never needs a second torch inside an isolated build environment.

Build cache (first match wins):
- `$ERPO_FAST_CACHE/torch_extensions`,
- `$TORCH_EXTENSIONS_DIR`,
- `~/.cache/erpo_fast/torch_extensions`.
Builds are keyed by Python, torch and CUDA versions, by a hash of the sources and flags, and by a hash of the
other paths torch writes into the build script (`build.ninja`): torch's and Python's header and library folders
(that is, the virtual environment) and the compiler. torch rebuilds whenever `build.ninja` changes, so a key that
left out a path in it made two environments sharing one cache rebuild over each other on every first use. The
sources are copied into the build folder and compiled from there, so checkouts with the same sources share
one build. Needs a C++ compiler and `ninja`.

No build can hang. torch's own build lock (`<build dir>/lock`) holds no owner, so a process killed during
the build used to leave every later process waiting on it forever. Builds here first take a lock of ours,
`<build dir>/erpo_build.lock`, holding pid, host and process start time:
- its owner is dead (kill -9, crash): the lock, and torch's lock beside it, are cleared, with a warning;
- its owner is alive (another process is compiling): we wait, saying so once, for at most
  `$ERPO_FAST_BUILD_TIMEOUT_S` seconds (default 600), then give up; the caller falls back to the torch
  sampler with a warning;
- while we hold ours, a torch lock in the folder can only be a dead build's, so it is removed.
The first build prints one line ("building the sampling op, first use, about 15 s").

CUDA builds compile for this machine's GPU only: without ``TORCH_CUDA_ARCH_LIST`` torch would build for its
default list (with a warning; minutes of nvcc), so `load_ops` sets it from the device's compute capability
(e.g. ``9.0`` on Hopper) and the arch list is part of the cache key. ``prebuild_in_background()`` starts that
build on a thread at start-up, and ``python -m erpo_fast.csrc`` builds ahead of time (e.g. in an image).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = ["load_ops", "ops_available", "cache_dir", "cuda_arch_list", "prebuild_in_background"]

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "loaded": True, or "error": the exception of a failed build
_log = logging.getLogger(__name__)

CPU_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-DNDEBUG"]
CUDA_FLAGS = ["-O3", "-DNDEBUG"]  # no --use_fast_math: the Gumbel noise needs an accurate logf
BUILD_LOCK_NAME = "erpo_build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
DEFAULT_BUILD_TIMEOUT_S = 600.0
_POLL_S = 0.2
_HALF_WRITTEN_GRACE_S = 10.0  # an empty lock file younger than this is a lock being written, not a stale one


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock for longer than the time limit."""


def _with_cuda() -> bool:
    if not (torch.cuda.is_available() and torch.version.cuda):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` for the CUDA build: the caller's value when set, else this device's capability."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cache_dir(with_cuda: bool | None = None) -> Path:
    """Build directory for this interpreter/torch/CUDA combination (created on demand)."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    if os.environ.get("ERPO_FAST_CACHE"):
        root = Path(os.environ["ERPO_FAST_CACHE"]) / "torch_extensions"
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    else:
        root = Path.home() / ".cache" / "erpo_fast" / "torch_extensions"
    # A stale .so built against another torch would load and crash, so the key names every ABI input; the
    # source hash keeps checkouts with different sources apart, the toolchain hash environments with other paths.
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    tag += f"_cu{torch.version.cuda}_sm{cuda_arch_list().replace(';', '-').replace(' ', '-')}" if with_cuda else "_cpu"
    tag += f"_{source_hash(with_cuda)}_{toolchain_hash(with_cuda)}"
    return root / tag.replace("+", "_")


def toolchain_hash(with_cuda: bool) -> str:
    """12 hex digits of SHA-256 over what build.ninja holds besides the sources: torch's folder (its include and
    lib paths), Python's include folder, the compiler and, with CUDA, CUDA_HOME and the architecture list."""
    import sysconfig

    parts = [str(Path(torch.__file__).resolve().parent), sysconfig.get_paths()["include"],
             os.environ.get("CXX", "c++")]
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        parts += [str(CUDA_HOME), cuda_arch_list()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _copy_sources(with_cuda: bool, build_dir: Path) -> Path:
    """The sources, copied into ``build_dir/src`` (same content by the key), so that build.ninja names no
    checkout's own path."""
    src = build_dir / "src"
    src.mkdir(exist_ok=True)
    for f in _source_files(with_cuda):
        target = src / f.name
        data = f.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    return src


def _source_files(with_cuda: bool) -> list[Path]:
    files = sorted(_HERE.glob("*.cpp")) + sorted(_HERE.glob("*.h"))
    if with_cuda:
        files += sorted(_HERE.glob("*.cu"))
    return files


def source_hash(with_cuda: bool) -> str:
    """12 hex digits of SHA-256 over the sources' names and contents and the compiler flags."""
    h = hashlib.sha256()
    for f in _source_files(with_cuda):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(repr((CPU_FLAGS, CUDA_FLAGS if with_cuda else None)).encode())
    return h.hexdigest()[:12]


def build_timeout_s() -> float:
    try:
        return float(os.environ.get("ERPO_FAST_BUILD_TIMEOUT_S", DEFAULT_BUILD_TIMEOUT_S))
    except ValueError:
        return DEFAULT_BUILD_TIMEOUT_S


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout_s: float | None = None):
    """Hold ``build_dir/erpo_build.lock`` for a build (see the module docstring). Raises BuildLockTimeout."""
    from erpo_fast.run_dir import lock_record, owner_alive, read_lock, try_create_lock

    timeout_s = build_timeout_s() if timeout_s is None else timeout_s
    path = build_dir / BUILD_LOCK_NAME
    deadline = time.monotonic() + timeout_s
    told = False
    me = lock_record()
    while not try_create_lock(path, me):
        record = read_lock(path)
        if record is None:
            continue  # released between our two looks
        if not record:  # empty or half-written: a process between creating and filling it, or killed there
            try:
                young = time.time() - path.stat().st_mtime < _HALF_WRITTEN_GRACE_S
            except FileNotFoundError:
                continue
            alive = young
        else:
            alive = owner_alive(record)
        if alive is False:
            _log.warning("erpo_fast: clearing a stale build lock in %s (pid %s is gone; killed during a build?)",
                         build_dir, record.get("pid", "?"))
            stale = path.with_name(f".{BUILD_LOCK_NAME}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, stale)  # of two processes clearing it, one wins the rename
                stale.unlink()
            continue
        if time.monotonic() > deadline:
            raise BuildLockTimeout(
                f"waited {timeout_s:.0f} s for the build lock {path} held by pid {record.get('pid', '?')} on "
                f"{record.get('host', '?')}; if no build is running there, delete that file "
                f"(ERPO_FAST_BUILD_TIMEOUT_S sets the limit)")
        if not told:
            print(f"erpo_fast: waiting for pid {record.get('pid', '?')} on {record.get('host', '?')} to finish "
                  f"building the sampling op (up to {timeout_s:.0f} s; lock {path})", file=sys.stderr, flush=True)
            told = True
        time.sleep(_POLL_S)
    try:
        # Every builder takes our lock first, so a torch lock found now was left by a dead build.
        with contextlib.suppress(FileNotFoundError):
            (build_dir / TORCH_LOCK_NAME).unlink()
        yield path
    finally:
        record = read_lock(path)
        if record and record.get("pid") == me["pid"] and record.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def load_ops(verbose: bool = False) -> None:
    """Build (first call only) and load the extension; raises RuntimeError if it cannot be built."""
    with _LOCK:
        if _STATE.get("loaded"):
            return
        if "error" in _STATE:
            raise RuntimeError(f"erpo_fast C++ ops failed to build: {_STATE['error']}") from _STATE["error"]
        from torch.utils.cpp_extension import load

        with_cuda = _with_cuda()
        build_dir = cache_dir(with_cuda)
        name = "erpo_fast_ops_cuda" if with_cuda else "erpo_fast_ops_cpu"
        try:
            if with_cuda:  # torch reads it at build time; one arch, not torch's default list
                os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
            build_dir.mkdir(parents=True, exist_ok=True)
            with build_lock(build_dir):
                src = _copy_sources(with_cuda, build_dir)
                sources = sorted(str(p) for p in src.glob("*.cpp"))
                if with_cuda:
                    sources += sorted(str(p) for p in src.glob("*.cu"))
                if not (build_dir / f"{name}.so").is_file():
                    print(f"erpo_fast: building the sampling op, first use, about {60 if with_cuda else 15} s "
                          f"(cached in {build_dir})", file=sys.stderr, flush=True)
                load(name=name, sources=sources, extra_cflags=CPU_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                     extra_include_paths=[str(src)], build_directory=str(build_dir), is_python_module=False,
                     verbose=verbose)
        except Exception as exc:  # compiler/ninja missing, compile error, lock timeout: remembered, not retried
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


def prebuild_in_background() -> threading.Thread:
    """Start building (or loading) the ops on a daemon thread, so the first use does not wait for nvcc; a
    failure is remembered as usual and reported by the first `load_ops` / `ops_available` call."""
    def build():
        with contextlib.suppress(RuntimeError):
            load_ops()

    thread = threading.Thread(target=build, name="erpo-csrc-build", daemon=True)
    thread.start()
    return thread


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
