"""``trainer.async_steps = K >= 1``: the learner's side of asynchronous off-policy training.

`AsyncRollout` stands where `erpo_fast.rollout.Rollout` stands in the loop (``collect``, ``sync_weights``,
``evaluate``, ``state_dict``), so `erpo_fast.train` reads the same in both modes. Behind it a rollout process
(`erpo_fast.rollout_worker`) with its own engine, threads and device samples batch t+K from the weights after
t updates while the learner trains on batch t. The learner publishes each new version into a ring of K in-memory
weight slots (`erpo_fast.weight_transport`) and reads batches, probes and evaluations back from a queue.

- **Exactly K behind.** Batch b comes from version ``max(b-1-K, start)``, whatever the timing; runs are
  reproducible, and a resumed run logs what the uninterrupted one logs: a checkpoint at step s holds the batches
  s+1..s+K already sampled (from versions the checkpoint no longer has) and the rollout state after them.
- **Corrected.** ``algorithm.is_level`` defaults to token for K >= 1: the learner scores each batch under its
  current weights and the truncated IS weight exp(learner - rollout) (each row at its own temperature) corrects
  the staleness. Each batch logs ``policy_version`` (the version that sampled it) and ``staleness`` (updates
  between that version and the one it trains).
- **ERPO.** The tracker lives in the rollout process and is updated as batches are scored, in batch order:
  the temperatures of batch b reflect the rewards of every batch up to b-1 (all sampled before b starts).
- **Torchrun.** Rank 0 owns the rollout process, which samples the global batch; each learner rank gets its
  contiguous slice of the groups (the slice a synchronous run's sampler would give it). Every rank takes part
  in gathering the weights (FSDP2) and in the sync check.
- **Failures.** An error in the rollout process is re-raised here with its own message; a rollout process that
  dies (killed, out of memory) stops the run with one line; the last checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erpo_fast import errors
from erpo_fast.batch import RolloutSequence, StepBatch
from erpo_fast.config import Config, ConfigError
from erpo_fast.distributed import Runtime, broadcast_object
from erpo_fast.lora import merged_shapes
from erpo_fast.models import resolve_dtype
from erpo_fast.rollout import check_probe, in_flight, restore_tracker, sync_check_due
from erpo_fast.rollout_worker import WorkerPlan, batch_version, pin_process, worker_main
from erpo_fast.weight_transport import WeightSlots

log = logging.getLogger("erpo_fast")

_POLL_S = 1.0  # how often a wait checks that the rollout process is still alive


class _EventSink:
    """Stands for the verifier pool: the loop points ``on_event`` at its logger; the rollout process's verifier
    incidents arrive here."""

    on_event = None


def sync_layout(learner) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor ``learner.named_weights()`` yields (a LoRA policy: its adapted layers)."""
    if learner.lora:
        return merged_shapes(learner.model)
    return {name: tuple(p.shape) for name, p in learner.model.named_parameters()}


class AsyncRollout:
    """The async rollout process behind `Rollout`'s interface; see the module docstring."""

    def __init__(self, cfg: Config, rt: Runtime, *, model_dir, train):
        self.cfg, self.rt, self.model_dir, self.train = cfg, rt, str(model_dir), train
        self.k = cfg.trainer.async_steps
        self.device = rollout_device(cfg, rt)
        self.rewards = _EventSink()
        self._restored: dict[int, StepBatch] = {}  # in-flight batches a checkpoint held
        self._rollout_state: dict | None = None  # the newest rollout state known (checkpoint, or the process)
        self._states: dict[int, dict] = {}  # rollout state after batch b
        self._results: dict[tuple[str, int], object] = {}
        self._consumed = -1  # the newest version the rollout process has copied into its engine
        self._proc = self._versions = self._queue = self._slots = None
        self._own_cpus: set[int] | None = None  # the learner's affinity before rollout.pin_cpus narrowed it
        self.start_step = 0
        self._restored_upto = 0
        self.last_sync_bytes = 0

    # ---- life cycle -----------------------------------------------------------------------------------------

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's rollout state and in-flight batches (before :meth:`start`)."""
        self._rollout_state = {k: state[k] for k in ("tracker", "sampler", "prompt_index")}
        saved = in_flight(state, async_steps=self.k)
        self._restored = {int(saved["first"]) + i: _batch_from_plain(p) for i, p in enumerate(saved["pending"])}

    def start(self, learner, start_step: int) -> None:
        """Spawn the rollout process (rank 0) and publish the starting weights (collective)."""
        self.start_step = start_step
        self._restored_upto = max(self._restored, default=start_step)  # the checkpoint's state is after this batch
        self._consumed = start_step - 1
        if self.rt.is_main:
            layout = sync_layout(learner)
            self._slots = WeightSlots(layout, num_slots=self.k, dtype=resolve_dtype(self.cfg.model.dtype, self.device),
                                      device=self.device)
            split = cpu_split(self.cfg, self.rt, self.device)
            if split is not None:
                self._own_cpus = os.sched_getaffinity(0)
                pin_process(split[0])
                log.info("async rollout: learner pinned to CPU(s) %s, rollout process to %s (rollout.pin_cpus)",
                         sorted(split[0]), sorted(split[1]))
            plan = WorkerPlan(config=self.cfg.to_dict(), model_dir=self.model_dir, device=str(self.device),
                              parent_pid=os.getpid(), start_step=start_step,
                              first_batch=start_step + 1 + len(self._restored), rollout_state=self._rollout_state,
                              cpus=None if split is None else tuple(sorted(split[1])))
            ctx = mp.get_context("spawn")
            self._versions, self._queue = ctx.Queue(), ctx.Queue()
            self._proc = ctx.Process(target=worker_main, args=(plan, self._slots, self._versions, self._queue),
                                     name="erpo-rollout", daemon=False)
            self._proc.start()
            log.info("async rollout: process %d on %s, %d weight slot(s) of %.1f MB, batches sampled %d update(s) "
                     "behind", self._proc.pid, self.device, self.k, self._slots.nbytes / 1e6, self.k)
        self._publish(learner, start_step)

    def close(self) -> None:
        if self._own_cpus is not None:  # the learner's own cores back (train() may run inside a longer process)
            pin_process(self._own_cpus)
            self._own_cpus = None
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.is_alive():
            self._versions.put(None)
            # Read what it still sends: a process exits only once its queue's buffered messages are delivered.
            deadline = time.monotonic() + 30
            while proc.is_alive() and time.monotonic() < deadline:
                try:
                    self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                except Exception:  # noqa: BLE001 - a read that Ctrl-C cut short left the pipe mid-message (seen:
                    break  # EOFError); nothing more can be read from it, and the process is stopped below
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        for q in (self._versions, self._queue):
            q.cancel_join_thread()
            q.close()

    # ---- one step -------------------------------------------------------------------------------------------

    def collect(self, step: int) -> StepBatch:
        """This rank's slice of batch ``step``, sampled by version ``step - 1 - K`` (see the module docstring)."""
        parts = None
        if self.rt.is_main:
            t0 = time.perf_counter()
            batch = self._restored.pop(step) if step in self._restored else self._take("batch", step)
            waited = time.perf_counter() - t0
            version = int(batch.metrics.get("policy_version", batch_version(step, self.k, self.start_step)))
            batch.metrics.update(policy_version=version, staleness=step - 1 - version, time_wait_rollout_s=waited)
            parts = split_batch(batch, self.rt.world_size, self.cfg.rollout.n)
        if not self.rt.distributed:
            return parts[0]
        box = [None]
        dist.scatter_object_list(box, parts, src=0)
        return box[0]

    def sync_weights(self, learner, step: int) -> dict:
        """Publish version ``step`` to the rollout process; when the sync check is due, verify that its engine
        samples from it (the learner is still at that version here)."""
        self._publish(learner, step)
        if not sync_check_due(self.cfg, step):
            return {}
        probe = broadcast_object(self._take("probe", step) if self.rt.is_main else None, self.rt)
        return check_probe(learner, probe, self.cfg, step)

    def evaluate(self, step: int) -> dict:
        """Held-out mean@k / pass@k of version ``step``, sampled by the rollout process."""
        result = broadcast_object(self._take("eval", step) if self.rt.is_main else None, self.rt)
        return result

    def state_dict(self) -> dict:
        """Called at the checkpoint after step s: waits for batches s+1..s+K (in flight) and returns them with
        the rollout state after the last of them. Rank 0's is the one saved."""
        if not self.rt.is_main:
            return {}
        step = self._published
        last = min(step + self.k, self.cfg.trainer.max_steps)
        pending = []
        for b in range(step + 1, last + 1):
            if b not in self._restored:
                self._restored[b] = self._take("batch", b)
            pending.append(_batch_to_plain(self._restored[b]))
        return {**self._state_after(last), "async": {"async_steps": self.k, "first": step + 1, "pending": pending}}

    @property
    def tracker(self):
        return restore_tracker(self.cfg, self._newest_state(), self.train)[2]

    @property
    def tracker_ids(self):
        return restore_tracker(self.cfg, self._newest_state(), self.train)[1]

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _newest_state(self) -> dict:
        return self._state_after(max(self._states, default=self._restored_upto))

    def _state_after(self, batch: int) -> dict:
        """The rollout state after ``batch``: sent with it by the rollout process, or the checkpoint's own when
        ``batch`` is the last one that checkpoint held."""
        if batch in self._states:
            return self._states[batch]
        if batch == self._restored_upto and self._rollout_state is not None:
            return self._rollout_state
        raise RuntimeError(f"async rollout: no rollout state after batch {batch}")

    def _publish(self, learner, version: int) -> None:
        """Write version ``version`` into its slot once the rollout process is done with the slot's previous
        version. Collective (the weights are gathered from every FSDP2 shard)."""
        self._published = version
        if self.rt.is_main:
            self._wait(lambda: self._consumed >= version - self.k, f"loading weight version {version - self.k}")
            self.last_sync_bytes = self._slots.write(version, learner.named_weights())  # one slot's bytes
            self._versions.put(version)
        else:
            for _ in learner.named_weights():
                pass

    def _take(self, kind: str, key: int):
        self._wait(lambda: (kind, key) in self._results, f"the {kind} of step {key}")
        return self._results.pop((kind, key))

    def _wait(self, ready, what: str) -> None:
        while not ready():
            try:
                msg = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise errors.TrainingAborted(
                        f"the rollout process died (exit code {self._proc.exitcode}) while the learner waited for "
                        f"{what}; the last checkpoint is kept in {self.cfg.trainer.output_dir}/checkpoints") from None
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "loaded":
            self._consumed = msg[1]
        elif kind == "event":
            _, name, message, details = msg
            if self.rewards.on_event is not None:
                self.rewards.on_event(name, message, **details)
            else:
                log.log(details.get("level", logging.WARNING), "%s", message)
        elif kind == "error":
            _, name, message, trace = msg
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, errors.ErpoError):
                raise cls(message)
            log.error("the rollout process failed:\n%s", trace)
            raise errors.TrainingAborted(f"the rollout process failed: {name}: {message}; the last checkpoint is "
                                         f"kept in {self.cfg.trainer.output_dir}/checkpoints")
        elif kind == "batch":
            _, b, batch, state = msg
            self._results[("batch", b)] = batch
            if state is not None:
                self._states[b] = state
        else:  # probe, eval
            self._results[(kind, msg[1])] = msg[2]


def rollout_device(cfg: Config, rt: Runtime) -> torch.device:
    """rollout.device resolved: the learner's on CPU; on CUDA the first GPU after the learner ranks' by default."""
    name = cfg.rollout.device
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"rollout.device={name!r} is not a device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"rollout.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if rt.device.type != "cuda":
        return torch.device("cpu")
    learner_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if torch.cuda.device_count() <= learner_gpus:
        raise ConfigError(f"trainer.async_steps={cfg.trainer.async_steps} needs a GPU for the rollout process beside "
                          f"the learner's {learner_gpus}, and this node has {torch.cuda.device_count()}: start fewer "
                          "learner ranks, set rollout.device, or use async_steps 0 (colocated, sleep mode)")
    return torch.device("cuda", learner_gpus)


def cpu_split(cfg: Config, rt: Runtime, device: torch.device) -> tuple[set[int], set[int]] | None:
    """(learner cores, rollout cores) for ``rollout.pin_cpus``: both sides on CPU, one learner process, fixed thread
    counts, and a core for every thread among those this process may use; else None (nothing pinned).

    Two busy processes on as many cores otherwise share them at the scheduler's will: on a 2-core machine the
    default job's learner step came out up to 30% longer in some runs than in identical ones (bench/NOTES.md)."""
    t = cfg.trainer.threads
    r = cfg.rollout.threads or t
    if not cfg.rollout.pin_cpus or rt.device.type != "cpu" or device.type != "cpu" or rt.world_size != 1 or not t:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if t + r > len(cores):
        return None
    return set(cores[:t]), set(cores[t:t + r])


def split_batch(batch: StepBatch, world_size: int, group_size: int) -> list[StepBatch]:
    """The global batch as ``world_size`` contiguous slices of whole groups (rank r's slice first-to-last, as the
    synchronous sampler deals them), each re-keyed from 0, with the global counts on every slice."""
    if world_size == 1:
        return [batch]
    groups = len(batch.sequences) // group_size
    parts = []
    for r in range(world_size):
        lo, hi = r * groups // world_size * group_size, (r + 1) * groups // world_size * group_size
        seqs = [dataclasses.replace(s, seq_key=i) for i, s in enumerate(batch.sequences[lo:hi])]
        parts.append(StepBatch(seqs, dict(batch.metrics), global_sequences=batch.global_sequences,
                               global_response_tokens=batch.global_response_tokens))
    return parts


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _batch_to_plain(batch: StepBatch) -> dict:
    """A StepBatch as lists and numbers (what a checkpoint's ``torch.load(weights_only=True)`` rebuilds)."""
    return {"sequences": [dataclasses.asdict(s) for s in batch.sequences],
            "metrics": {k: _plain(v) for k, v in batch.metrics.items()},
            "global_sequences": int(batch.global_sequences),
            "global_response_tokens": int(batch.global_response_tokens)}


def _batch_from_plain(d: dict) -> StepBatch:
    return StepBatch([RolloutSequence(**s) for s in d["sequences"]], dict(d["metrics"]),
                     global_sequences=d["global_sequences"], global_response_tokens=d["global_response_tokens"])
