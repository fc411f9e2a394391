"""Atomic training checkpoints that hold everything an exact resume needs, plus RNG capture/restore.

Layout of one checkpoint (``output_dir/checkpoints/step_00000010/``)::

    model/              filled by the caller's ``save_model(dir)`` (HF ``save_pretrained`` + tokenizer)
    optimizer/          filled by ``save_shards(dir)`` on EVERY rank (``torch.distributed.checkpoint``: one
                        ``__<rank>_0.distcp`` file per rank plus ``.metadata``); absent without ``save_shards``
    trainer_state.pt    ``state`` with every numpy array swapped for a small marker; ``torch.save``
    arrays.npz          those numpy arrays (exact dtype and values), loaded with ``allow_pickle=False``
    config.yaml         ``yaml.safe_dump(config)``
    COMPLETE            written last: JSON manifest
                        ``{"format": 2, "step", "files": {relative path: {"bytes": n, "sha256": hex}}}``

Why this shape: ``trainer_state.pt`` then holds only tensors and plain Python data, so loading can use
``torch.load(weights_only=True)`` (no arbitrary unpickling), and the state is checked against that allow-list
when saving, so a resume never discovers an unloadable checkpoint. The manifest's sizes catch truncated files
at once, its SHA-256 content hashes catch any other corruption (a flipped byte, a same-size overwrite); both are
checked by ``load_checkpoint``. Format 1 checkpoints (sizes only) still load. ``latest_intact_checkpoint``, which
``--resume`` uses, skips a corrupted newest checkpoint with a warning naming it and returns the newest intact one.

Atomicity: a save writes into ``checkpoints/.tmp-step_XXXXXXXX-<pid>``, fsyncs every file and folder, then
renames it into place. A same-step checkpoint is first renamed aside to ``.replaced-step_XXXXXXXX-<pid>`` and
deleted only after the new one is in place; if the process dies between the two renames,
``latest_checkpoint`` still finds the aside copy and the next save moves it back. Pruned checkpoints are
renamed to ``.trash-*`` before deletion, so a half-deleted folder never looks like a checkpoint.
One writer per ``output_dir``: in a distributed run every rank calls ``save_checkpoint`` (with ``runtime``);
rank 0 makes the temporary folder, every rank writes its shards into it, and rank 0 writes the rest, the
manifest (which covers every rank's shard) and does the rename. A save deletes every ``.tmp-*``/``.trash-*``
left over in ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from erpo_fast.distributed import Runtime, barrier, broadcast_object
from erpo_fast.errors import CheckpointError, first_line

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: sizes only in the manifest
_HASH_CHUNK = 1 << 20
log = logging.getLogger("erpo_fast")
_VERIFIED: set[tuple] = set()  # the last checkpoint verified (see verify_checkpoint)
CHECKPOINTS_DIRNAME = "checkpoints"
MODEL_DIRNAME = "model"
SHARDS_DIRNAME = "optimizer"
STATE_FILENAME = "trainer_state.pt"
ARRAYS_FILENAME = "arrays.npz"
CONFIG_FILENAME = "config.yaml"
COMPLETE_FILENAME = "COMPLETE"

# Stands in for a numpy array in trainer_state.pt: {_NUMPY_MARKER: [key in arrays.npz, was a numpy scalar]}.
_NUMPY_MARKER = "__erpo_fast_numpy__"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REPLACED_DIR = re.compile(r"^\.replaced-step_(\d+)-\d+$")
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, bytearray, type(None),
                 torch.dtype, torch.device, torch.Size)
_DICT_TYPES = (dict, OrderedDict, Counter)


def _tensor_types() -> tuple[type, ...]:
    # Types torch.load(weights_only=True) rebuilds. DTensor (FSDP2) is on its allow-list in recent torch.
    types: list[type] = [torch.Tensor, torch.nn.Parameter]
    try:
        from torch.distributed.tensor import DTensor

        types.append(DTensor)
    except ImportError:
        pass
    return tuple(types)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------------
# numpy arrays out of / back into the state tree


def _split_numpy(obj: Any, arrays: dict[str, np.ndarray], where: str, tensor_types: tuple[type, ...]) -> Any:
    """Copy of ``obj`` with numpy arrays/scalars replaced by markers (collected in ``arrays``); checks that
    every leaf is something ``torch.load(weights_only=True)`` can rebuild."""
    if isinstance(obj, (np.ndarray, np.generic)):
        if type(obj) is not np.ndarray and not isinstance(obj, np.generic):
            raise ValueError(f"state{where}: numpy array subclass {type(obj).__name__} is not supported; "
                             "pass a plain np.ndarray")
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise ValueError(f"state{where}: numpy array of dtype object cannot be saved without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = arr
        return {_NUMPY_MARKER: [key, isinstance(obj, np.generic)]}
    if type(obj) in _DICT_TYPES:
        if _NUMPY_MARKER in obj:
            raise ValueError(f"state{where}: the key {_NUMPY_MARKER!r} is reserved by the checkpoint format")
        out = type(obj)()
        for k, v in obj.items():
            _check_key(k, f"{where}[{k!r}]")
            out[k] = _split_numpy(v, arrays, f"{where}[{k!r}]", tensor_types)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_split_numpy(v, arrays, f"{where}[{i}]", tensor_types) for i, v in enumerate(obj))
    if type(obj) is set:
        for v in obj:
            _check_key(v, f"{where}{{{v!r}}}")
        return set(obj)
    if type(obj) in tensor_types or isinstance(obj, _PLAIN_LEAVES):
        return obj
    raise ValueError(f"state{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which "
                     "torch.load(weights_only=True) cannot rebuild; convert it to tensors, numpy or plain "
                     "Python data")


def _check_key(k: Any, where: str) -> None:
    if isinstance(k, tuple):
        for item in k:
            _check_key(item, where)
    elif not isinstance(k, (bool, int, float, str, bytes, type(None))):
        raise ValueError(f"state{where}: dict key/set item of type {type(k).__name__} is not supported; "
                         "use str/int/float/bool/None/tuple")


def _join_numpy(obj: Any, arrays: Any) -> Any:
    if type(obj) in _DICT_TYPES:
        if _NUMPY_MARKER in obj:
            key, is_scalar = obj[_NUMPY_MARKER]
            if key not in arrays:
                raise KeyError(key)
            arr = arrays[key]
            return arr[()] if is_scalar else arr
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _join_numpy(v, arrays)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_join_numpy(v, arrays) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------
# durable file plumbing


def _fsync_path(path: Path) -> None:
    # Directories must be fsync'ed too, or a completed rename/creation may not survive a power cut.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _manifest(root: Path) -> dict[str, dict]:
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return dict(sorted(files.items()))


def _plain_config(obj: Any) -> Any:
    # Tuples and Paths are common in configs; YAML's safe dumper has no tag for either.
    if isinstance(obj, dict):
        return {k: _plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_config(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _remove_leftovers(ckpt_root: Path) -> None:
    for child in ckpt_root.iterdir():
        if child.name.startswith(_LEFTOVER_PREFIXES):
            shutil.rmtree(child, ignore_errors=True)
        m = _REPLACED_DIR.match(child.name)
        if m:
            # A crash between "rename old aside" and "rename new into place": the aside copy is the only one.
            final = ckpt_root / step_dirname(int(m.group(1)))
            if not final.exists() and (child / COMPLETE_FILENAME).is_file():
                os.rename(child, final)
            else:
                shutil.rmtree(child, ignore_errors=True)


def _complete_checkpoints(ckpt_root: Path) -> dict[int, Path]:
    """step -> path of every complete checkpoint, aside copies included when their final name is missing."""
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    if not ckpt_root.is_dir():
        return found
    for child in ckpt_root.iterdir():
        for pattern, into in ((_STEP_DIR, found), (_REPLACED_DIR, aside)):
            m = pattern.match(child.name)
            if m and child.is_dir() and (child / COMPLETE_FILENAME).is_file():
                into[int(m.group(1))] = child
    for step, path in aside.items():
        found.setdefault(step, path)
    return found


# ----------------------------------------------------------------------------------------------------------
# public API


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, save_model: Callable[[Path], None],
                    state: dict, config: dict, keep_last: int,
                    save_shards: Callable[[Path], None] | None = None, runtime: Runtime | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the ``keep_last`` newest complete checkpoints.

    ``save_model(dir)`` fills ``model/``; ``state`` may hold tensors, numpy arrays and plain Python data
    (dicts, lists, tuples, scalars, strings). The checkpoint just written is never pruned. Returns its path.

    Distributed (``runtime`` with world size > 1): every rank calls this; ``save_shards(dir)`` runs on every
    rank (a collective, e.g. ``Learner.save_optimizer``), everything else on rank 0 only (the other ranks'
    ``save_model``, ``state`` and ``config`` are not used).
    """
    main = runtime is None or runtime.is_main
    tmp = None
    try:
        if main:
            tmp, final, torch_state, arrays, config_text = _begin_save(output_dir, step, state, config, keep_last)
    finally:
        # Every rank learns where to write its shards (or that rank 0 failed: then every rank raises).
        where = broadcast_object(None if tmp is None else str(tmp), runtime) if runtime is not None else None
    if not main and where is None:
        raise CheckpointError(f"rank 0 could not start checkpoint {step}; see its error")
    if save_shards is not None:
        try:
            save_shards((tmp if main else Path(where)) / SHARDS_DIRNAME)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if main:
        path = _finish_save(tmp, final, int(step), torch_state, arrays, config_text, save_model, keep_last)
    if runtime is not None:
        barrier(runtime)  # the others return once the checkpoint is in place
    return path if main else Path(output_dir) / CHECKPOINTS_DIRNAME / step_dirname(step)


def _begin_save(output_dir, step, state: dict, config: dict, keep_last: int):
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    step = int(step)
    arrays: dict[str, np.ndarray] = {}
    torch_state = _split_numpy(state, arrays, "", _tensor_types())
    try:
        config_text = yaml.safe_dump(_plain_config(config), sort_keys=False)
    except yaml.YAMLError as e:
        raise ValueError(f"config is not YAML-serialisable: {str(e).splitlines()[0]}") from None

    ckpt_root = Path(output_dir) / CHECKPOINTS_DIRNAME
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(ckpt_root)
    name = step_dirname(step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final, torch_state, arrays, config_text


def _finish_save(tmp: Path, final: Path, step: int, torch_state, arrays: dict, config_text: str,
                 save_model: Callable[[Path], None], keep_last: int) -> Path:
    ckpt_root, name = tmp.parent, final.name
    try:
        torch.save(torch_state, tmp / STATE_FILENAME)
        with open(tmp / ARRAYS_FILENAME, "wb") as f:
            np.savez(f, **arrays)
        (tmp / CONFIG_FILENAME).write_text(config_text)
        model_dir = tmp / MODEL_DIRNAME
        model_dir.mkdir()
        save_model(model_dir)
        _fsync_tree(tmp)
        manifest = {"format": FORMAT_VERSION, "step": step, "files": _manifest(tmp)}
        with open(tmp / COMPLETE_FILENAME, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    aside = None
    try:
        if final.exists():
            # os.rename cannot replace a non-empty folder: move the old aside, delete it once the new is in.
            aside = ckpt_root / f".replaced-{name}-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
    except BaseException:
        if aside is not None and aside.exists() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(ckpt_root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)

    complete = _complete_checkpoints(ckpt_root)
    others = sorted(s for s, p in complete.items() if p != final)
    for old_step in others[: max(0, len(others) - (keep_last - 1))]:
        path = complete[old_step]
        trash = ckpt_root / f".trash-{path.name.lstrip('.')}-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_path(ckpt_root)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, or None (its files are
    not read: see ``latest_intact_checkpoint``)."""
    complete = _complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIRNAME)
    return complete[max(complete)] if complete else None


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of every checkpoint folder under ``output_dir/checkpoints``, intact or not, sorted."""
    root = Path(output_dir) / CHECKPOINTS_DIRNAME
    steps = set(_complete_checkpoints(root))
    if root.is_dir():
        steps.update(int(m.group(1)) for c in root.iterdir() if (m := _STEP_DIR.match(c.name)) and c.is_dir())
    return sorted(steps)


def latest_intact_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose files all match the manifest (sizes and content hashes), or None.

    A corrupted newer one (truncated or overwritten file, a disk error) is skipped with a warning that names
    it, so that a resume falls back to the previous intact checkpoint instead of failing.
    """
    complete = _complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIRNAME)
    for step in sorted(complete, reverse=True):
        try:
            verify_checkpoint(complete[step])
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s; falling back to an older one", complete[step].name, e)
            continue
        return complete[step]
    return None


def verify_checkpoint(path: str | os.PathLike) -> tuple[int, dict]:
    """Check a checkpoint's manifest against its files (presence, size, SHA-256); returns (step, manifest
    files). Raises CheckpointError naming the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    marker = path / COMPLETE_FILENAME
    if not marker.is_file():
        raise CheckpointError(f"incomplete checkpoint (no {COMPLETE_FILENAME} marker; its save was "
                              f"interrupted): {path}")
    try:
        manifest = json.loads(marker.read_text())
        step, files = int(manifest["step"]), dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupted checkpoint {path}: unreadable {COMPLETE_FILENAME} ({e})") from None
    fmt = manifest.get("format")
    if fmt not in _READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} has format {fmt!r}; this version reads formats "
                              f"{', '.join(map(str, _READABLE_FORMATS))}")
    # Sizes first (cheap, and a truncated file is the common case), then content.
    expected_hash = {}
    for rel, entry in files.items():
        if fmt == 1:
            size, digest = entry, None
        else:
            try:
                size, digest = int(entry["bytes"]), str(entry["sha256"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"corrupted checkpoint {path}: unreadable {COMPLETE_FILENAME} entry for "
                                      f"{rel}") from None
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"corrupted checkpoint {path}: file {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"corrupted checkpoint {path}: file {rel} has {f.stat().st_size} bytes, "
                                  f"expected {size}")
        expected_hash[rel] = digest
    # Hashing a large model takes seconds: remember a verified checkpoint while no file of it has changed
    # (resume verifies in latest_intact_checkpoint, then again in load_checkpoint).
    key = (str(path.resolve()), marker.stat().st_mtime_ns,
           tuple((rel, (path / rel).stat().st_mtime_ns) for rel in expected_hash))
    if key not in _VERIFIED:
        for rel, digest in expected_hash.items():
            if digest is not None and _sha256(path / rel) != digest:
                raise CheckpointError(f"corrupted checkpoint file {path / rel}: its content does not match the "
                                      f"SHA-256 in {COMPLETE_FILENAME}")
        _VERIFIED.clear()
        _VERIFIED.add(key)
    return step, files


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint folder after verifying every file's size and content hash:
    ``{"step", "state", "config", "model_dir", "shards_dir"}`` (``shards_dir`` None when the checkpoint has no
    sharded optimizer state); raises CheckpointError."""
    path = Path(path)
    step, _ = verify_checkpoint(path)

    def corrupted(name: str, e: BaseException) -> CheckpointError:
        return CheckpointError(f"corrupted checkpoint file {path / name}: {first_line(e)}")

    try:
        torch_state = torch.load(path / STATE_FILENAME, map_location="cpu", weights_only=True)
    except Exception as e:
        raise corrupted(STATE_FILENAME, e) from None
    try:
        with np.load(path / ARRAYS_FILENAME, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        state = _join_numpy(torch_state, arrays)
    except Exception as e:
        raise corrupted(ARRAYS_FILENAME, e) from None
    try:
        config = yaml.safe_load((path / CONFIG_FILENAME).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise corrupted(CONFIG_FILENAME, e) from None
    return {"step": step, "state": state, "config": config if config is not None else {},
            "model_dir": path / MODEL_DIRNAME,
            "shards_dir": path / SHARDS_DIRNAME if (path / SHARDS_DIRNAME).is_dir() else None}


def saved_run_config(output_dir: str | os.PathLike) -> dict | None:
    """The config of the run in ``output_dir``, from its newest complete checkpoint's config.yaml (checked
    against the manifest's hash; the weights are not read), or None when there is no checkpoint."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    try:
        entry = json.loads((path / COMPLETE_FILENAME).read_text())["files"][CONFIG_FILENAME]
        if isinstance(entry, dict) and _sha256(path / CONFIG_FILENAME) != entry["sha256"]:
            raise ValueError(f"its content does not match the SHA-256 in {COMPLETE_FILENAME}")
        config = yaml.safe_load((path / CONFIG_FILENAME).read_text())
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"corrupted checkpoint file {path / CONFIG_FILENAME}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"corrupted checkpoint file {path / CONFIG_FILENAME}: not a mapping")
    return config


def capture_rng_state() -> dict:
    """Every random stream a run draws from: python ``random``, numpy's global RNG, torch CPU and all CUDA
    devices. Store it in ``state`` (it is checkpoint-safe) and give it back to ``restore_rng_state``."""
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(d: dict) -> None:
    """Put back the streams captured by ``capture_rng_state``, so the next draws repeat exactly."""
    missing = [k for k in ("python", "numpy", "torch") if k not in d]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; pass what capture_rng_state() returned")
    version, internal, gauss = d["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(d["numpy"])
    torch.set_rng_state(d["torch"])
    cuda = d.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn("the RNG state holds CUDA generators but CUDA is not available; CUDA RNG not restored",
                      stacklevel=2)
        return
    if len(cuda) != torch.cuda.device_count():
        raise ValueError(f"the RNG state holds {len(cuda)} CUDA generators but {torch.cuda.device_count()} "
                         "devices are visible; resume with the same devices")
    torch.cuda.set_rng_state_all(cuda)
