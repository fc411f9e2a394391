"""The async rollout process (``trainer.async_steps = K >= 1``): a whole `Rollout` of its own, fed by weight versions.

It holds the data side of training (prompt sampler, ERPO tracker, engine, verifiers) for the global batch, and
walks the weight versions in order. For each version v the learner publishes (`erpo_fast.weight_transport`):

1. copy version v into the engine and acknowledge it (``("loaded", v)``; the learner may then reuse the slot);
2. sample the sync-check probe when the sync check is due at step v (``("probe", v, sequences)``);
3. run the held-out evaluation when one is due at step v (``("eval", v, result)``);
4. roll out, score and turn into learner sequences every batch whose behaviour policy is version v:
   batch b comes from version ``max(b - 1 - K, start_step)`` (``("batch", b, batch, state)``).

So batch b is sampled exactly K updates behind the learner that trains on it (the first K+1 batches of a fresh
run all come from the starting weights), and what it holds depends only on the config and the weights, never on
timing: a run is reproducible. The tracker is updated as batches are scored, in batch order, so the temperatures
of batch b reflect every batch up to b-1, whichever versions sampled them.

Everything the learner asks is decided by the config (`due_events`), so the two processes never negotiate: the
learner publishes versions and reads results. The rollout state (tracker, sampler, prompt index) travels with
the batches a checkpoint needs (`state_wanted`). An exception here goes to the learner as ``("error", ...)``,
which re-raises it there; Ctrl-C ends this process quietly (the learner's side reports it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import traceback
from dataclasses import dataclass

import torch

log = logging.getLogger("erpo_fast")


@dataclass(frozen=True)
class WorkerPlan:
    """What the rollout process is told at spawn."""

    config: dict  # Config.to_dict(), validated
    parent_pid: int  # the learner's process: this one ends when it does
    model_dir: str  # architecture, tokenizer (the weights come from the slots)
    device: str
    start_step: int  # the learner's step at start: version start_step is published first
    first_batch: int  # the first batch to sample (start_step + 1 + the in-flight batches a checkpoint held)
    rollout_state: dict | None  # tracker, sampler, prompt index to continue from
    cpus: tuple[int, ...] | None = None  # the cores this process (and its verifiers) keeps to (rollout.pin_cpus)


def pin_process(cores: set[int]) -> None:
    """Every thread of this process onto ``cores`` (an affinity call moves only the calling thread; torch's
    intra-op threads may exist already). Threads started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def batch_version(batch: int, async_steps: int, start_step: int) -> int:
    """The weight version that samples ``batch``: exactly ``async_steps`` updates behind its learner step."""
    return max(batch - 1 - async_steps, start_step)


def eval_due(cfg, version: int, start_step: int) -> bool:
    """Whether the loop evaluates at step ``version`` (before training, every eval_every steps, at the end)."""
    t = cfg.trainer
    return (version == 0 == start_step) or version == t.max_steps or (
        version > start_step and bool(t.eval_every) and version % t.eval_every == 0)


def save_steps(cfg) -> set[int]:
    t = cfg.trainer
    return {s for s in range(1, t.max_steps + 1) if t.save_every and s % t.save_every == 0} | {t.max_steps}


def state_wanted(cfg, batch: int) -> bool:
    """Whether ``batch`` is the last one in flight at a checkpoint (or the run's last): its rollout state is sent."""
    k, last = cfg.trainer.async_steps, cfg.trainer.max_steps
    return batch == last or any(min(s + k, last) == batch for s in save_steps(cfg))


def _next_version(versions, parent_pid: int) -> int | None:
    """The next published version, or None when the learner says stop or is gone (killed without a word)."""
    while True:
        try:
            return versions.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return None


def _die_with_the_learner() -> None:
    """Linux: SIGTERM this process when the learner's process dies, even from SIGKILL (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the parent-pid check between versions ends it


def _leave_the_learners_world(device: torch.device) -> None:
    """Under torchrun this process inherits rank 0's RANK / WORLD_SIZE / MASTER_PORT; it is a world of its own
    (vLLM's external_launcher would otherwise try to join the learners' process group). On CUDA LOCAL_RANK names
    the rollout GPU, where external_launcher places vLLM's engine (the engine sets up the rest of its world)."""
    for name in [k for k in os.environ if k.startswith("TORCHELASTIC_")] + [
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"]:
        os.environ.pop(name, None)
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index or 0)


def worker_main(plan: WorkerPlan, slots, versions, results) -> None:
    """Entry point of the rollout process (spawned by `erpo_fast.async_rollout.AsyncRollout`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [rollout] %(message)s")
    _die_with_the_learner()
    try:
        _serve(plan, slots, versions, results)
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group; the learner reports it. Exit without waiting for the results
        # queue's feeder thread: an interrupt inside put() can lose the wake-up that ends it (Condition.notify
        # cut short), and the exit then waited for the learner's 30 s deadline (7 of 134 Ctrl-Cs in a repro loop).
        results.cancel_join_thread()
    except BaseException as e:  # noqa: BLE001 - everything goes to the learner, which stops the run
        results.put(("error", type(e).__name__, str(e), traceback.format_exc()))


def _serve(plan: WorkerPlan, slots, versions, results) -> None:
    from erpo_fast.config import Config, apply_overrides, validate
    from erpo_fast.distributed import Runtime
    from erpo_fast.models import load_model
    from erpo_fast.rollout import Rollout, sync_check_due
    from erpo_fast.session import load_data, make_rewards, make_rollout_engine

    device = torch.device(plan.device)
    if plan.cpus is not None:
        pin_process(set(plan.cpus))  # before the verifier processes start: they inherit it
    _leave_the_learners_world(device)
    cfg = Config()
    apply_overrides(cfg, plan.config, source="async rollout")
    validate(cfg)
    cfg.trainer.threads = cfg.rollout.threads or cfg.trainer.threads
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    k, last = cfg.trainer.async_steps, cfg.trainer.max_steps
    train, heldout = load_data(cfg)
    model, tokenizer = load_model(plan.model_dir, dtype="float32", attn_implementation=cfg.model.attn_implementation,
                                  device=device)
    engine = make_rollout_engine(cfg, model, plan.model_dir, device, give_model=True)
    del model
    # One process samples the global batch: a world of one (AsyncRollout splits it across learner ranks).
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=device)
    rollout = Rollout(cfg, rt, tokenizer=tokenizer, engine=engine, rewards=make_rewards(cfg), train=train,
                      heldout=heldout, colocated=False)
    rollout.rewards.on_event = lambda kind, message, **details: results.put(("event", kind, message, details))
    try:
        if plan.rollout_state is not None:
            rollout.load_state_dict(plan.rollout_state)
        batch = plan.first_batch
        for version in range(plan.start_step, last + 1):
            published = _next_version(versions, plan.parent_pid)
            if published is None:  # the learner stops early
                return
            if published != version:
                raise RuntimeError(f"async rollout: expected weight version {version}, got {published}")
            engine.update_weights(slots.views(version).items())
            results.put(("loaded", version))
            if version > plan.start_step and sync_check_due(cfg, version):
                results.put(("probe", version, rollout.sample_probe(version)))
            if eval_due(cfg, version, plan.start_step):
                results.put(("eval", version, rollout.evaluate(version)))
            while batch <= last and batch_version(batch, k, plan.start_step) == version:
                step_batch = rollout.collect(batch)
                step_batch.metrics["policy_version"] = version
                results.put(("batch", batch, step_batch,
                             rollout.state_dict() if state_wanted(cfg, batch) else None))
                batch += 1
        _next_version(versions, plan.parent_pid)  # every version served: wait for the learner's stop
    finally:
        rollout.close()
