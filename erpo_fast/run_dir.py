"""The run directory: one live run per ``output_dir``, and no silent mixing of two runs' files.

- ``output_dir`` naming something that is not a folder is a one-line usage error.
- A lock file ``output_dir/run.lock`` holds the owner's pid, host and start time. A second run while that
  process is alive exits with a usage error (rc 2); a lock left by a dead process (kill -9, power cut) on this
  host is taken over with a warning. A lock from another host cannot be checked and is never taken over: the
  message says which file to delete once that run is known to be gone.
- A fresh run (no ``--resume``) into a folder that already holds checkpoints exits with a usage error unless
  ``--overwrite`` is given: otherwise the old run's newest checkpoint would survive pruning, and a later
  ``--resume`` would silently continue the wrong model. ``--overwrite`` deletes the old checkpoints, summary
  and plots (``metrics.jsonl``/``events.jsonl`` are restarted by the logger anyway).

In a distributed run rank 0 does the checks and holds the lock; the verdict is broadcast, so every rank
stops with the same message instead of hanging in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from erpo_fast.checkpoint import CHECKPOINTS_DIRNAME, checkpoint_steps
from erpo_fast.errors import RunDirError

log = logging.getLogger("erpo_fast")

LOCK_FILENAME = "run.lock"
# What --overwrite removes besides checkpoints/ (metrics.jsonl and events.jsonl are restarted by RunLogger).
_RUN_OUTPUTS = ("summary.json", "plots", "tb", "wandb_run_id.txt")


def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), so that a recycled pid is not taken for the
    lock's owner; None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the "(comm)" field


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """True if process ``pid`` exists on this host (and, given ``start_time``, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False  # the pid was recycled by another process
    # A zombie (killed, not yet reaped by its parent) holds nothing any more.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid()),
            "since": round(time.time(), 3)}


def read_lock(path: Path) -> dict | None:
    """The lock's record, or None when the file vanished; an unreadable (half-written) lock reads as {}."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def owner_alive(record: dict) -> bool | None:
    """True/False for a lock taken on this host; None when it comes from another host (cannot be checked)."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        pid = int(record.get("pid"))
    except (TypeError, ValueError):
        return False
    return pid_alive(pid, record.get("start_time"))


def try_create_lock(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` if it does not exist (atomic: O_EXCL); False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


class RunLock:
    """The lock on one output directory; ``release()`` removes it (only if it is still ours)."""

    def __init__(self, path: Path | None):
        self.path = path

    def release(self) -> None:
        if self.path is None:
            return
        record = read_lock(self.path)
        if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.path = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lock(output_dir: Path) -> RunLock:
    """Take ``output_dir/run.lock``; raises RunDirError while another live run holds it."""
    path = output_dir / LOCK_FILENAME
    for _ in range(3):  # a race with another starter or a vanishing lock: look again
        if try_create_lock(path, lock_record()):
            return RunLock(path)
        record = read_lock(path)
        if record is None:
            continue
        if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            return RunLock(path)  # left by an earlier run in this same process that did not release it
        alive = owner_alive(record) if record else False
        if alive:
            raise RunDirError(f"another run (pid {record.get('pid')} on {record.get('host')}) is writing to "
                              f"{output_dir}; wait for it to finish or choose another --output-dir")
        if alive is None:
            raise RunDirError(f"{output_dir} is locked by a run on host {record.get('host')} (pid "
                              f"{record.get('pid')}), which cannot be checked from here; if that run is over, "
                              f"delete {path}")
        log.warning("%s: taking over the lock of a run that no longer exists (pid %s)", output_dir,
                    record.get("pid"))
        # Rename-then-delete: of two processes clearing the same stale lock, only one wins the rename.
        stale = path.with_name(f".{LOCK_FILENAME}.stale-{os.getpid()}")
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            continue
        stale.unlink(missing_ok=True)
    raise RunDirError(f"could not lock {output_dir} (another run keeps taking it); try again")


def prepare_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunLock:
    """Check ``output_dir`` for a fresh/resumed run and lock it; raises RunDirError (one line) when it
    cannot be used. Returns the lock, to be released when the run ends."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"--output-dir {out}: a parent of it is a file, not a directory") from None
    except PermissionError:
        raise RunDirError(f"--output-dir {out}: permission denied") from None
    lock = acquire_lock(out)
    try:
        steps = checkpoint_steps(out)
        if steps and not resume:
            if not overwrite:
                raise RunDirError(f"{out} already holds checkpoints of another run (newest: step {max(steps)}); "
                                  "pass --resume to continue it, --overwrite to delete it and start afresh, or "
                                  "choose another --output-dir")
            log.warning("--overwrite: deleting the previous run in %s (checkpoints up to step %d)", out, max(steps))
        if overwrite and not resume:
            for name in (CHECKPOINTS_DIRNAME, *_RUN_OUTPUTS):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_run(cfg, rt) -> RunLock:
    """``prepare_output_dir`` on rank 0, with its verdict shared by every rank."""
    from erpo_fast.distributed import broadcast_object

    lock, error = RunLock(None), None
    if rt.is_main:
        try:
            lock = prepare_output_dir(cfg.trainer.output_dir, resume=cfg.trainer.resume,
                                      overwrite=cfg.trainer.overwrite)
        except RunDirError as e:
            error = str(e)
    error = broadcast_object(error, rt)
    if error is not None:
        raise RunDirError(error)
    return lock
