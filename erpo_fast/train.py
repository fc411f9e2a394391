"""python -m erpo_fast.train: GRPO-family / ERPO training, colocated rollout engine and learner.

With no arguments it runs the embedded default (preset tiny-cpu): a tiny Qwen2 with a character tokenizer,
warm-started on the built-in digits task, then trained with ERPO on a CPU. See the README for the knobs;
`--help` lists them all. Under `torchrun --nproc_per_node K` the learner is sharded with FSDP2.

One step (`train_step`): ``batch = rollout.collect(step)`` (pick prompts -> the tracker gives each its temperature
-> roll out n samples per prompt -> score -> update the tracker, advantages (+RA), DAPO filtering; see
`erpo_fast.rollout`) -> ``learner.train_on(batch)`` (fused loss; `erpo_fast.learner`) ->
``rollout.sync_weights(learner, step)`` (the new weights into the engine, and the sync check) -> log, evaluate,
checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch

from erpo_fast.checkpoint import save_checkpoint, saved_run_config
from erpo_fast.config import Config, config_from_cli, help_text
from erpo_fast.distributed import barrier, init_runtime, shutdown
from erpo_fast.errors import TrainingAborted, UserError
from erpo_fast.interrupts import CtrlC
from erpo_fast.logger import RunLogger
from erpo_fast.lora import MERGED_DIRNAME, save_adapters
from erpo_fast.profiling import StepProfiler
from erpo_fast.run_dir import prepare_run
from erpo_fast.run_summary import finish
from erpo_fast.session import Session, build_session

log = logging.getLogger("erpo_fast")

USAGE = "usage: python -m erpo_fast.train [--plan] [--preset NAME] [--config FILE.yaml] [--section.knob VALUE ...]"


def train(cfg: Config) -> dict:
    """Run training as configured; returns the end-of-run summary."""
    rt = init_runtime(cfg.trainer.device)
    if ":" in cfg.data.reward:  # a custom verifier that does not import fails now, not after the warm start
        from erpo_fast.rewards import get_reward_fn

        get_reward_fn(cfg.data.reward)
    run_lock = prepare_run(cfg, rt)  # one live run per output_dir; no fresh run over another run's checkpoints
    try:
        with CtrlC() as ctrl_c:
            return _train(cfg, rt, ctrl_c)
    finally:
        run_lock.release()


def _train(cfg: Config, rt, ctrl_c: CtrlC) -> dict:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    out = Path(cfg.trainer.output_dir)
    profiler = StepProfiler(cfg.trainer.profile_steps, out, max_steps=cfg.trainer.max_steps, rank=rt.rank,
                            world_size=rt.world_size, device=rt.device)
    s = build_session(cfg, rt)
    profiler.attach(s)
    logger = RunLogger(out, total_steps=cfg.trainer.max_steps, start_step=s.start_step,
                       progress=cfg.logging.progress and rt.is_main, tensorboard=cfg.logging.tensorboard and rt.is_main,
                       wandb=cfg.logging.wandb and rt.is_main, wandb_project=cfg.logging.wandb_project,
                       config=cfg.to_dict(), progress_every=cfg.logging.progress_every) if rt.is_main else None
    if logger:
        s.rollout.rewards.on_event = logger.log_event  # verifier timeouts and errors go to events.jsonl
    try:
        if s.start_step == 0:
            s.heldout_before = s.rollout.evaluate(step=0)
        last_eval: tuple[int, dict] | None = None  # (step, result) of the newest held-out evaluation
        for step in range(s.start_step + 1, cfg.trainer.max_steps + 1):
            ctrl_c.check()  # a Ctrl-C that something swallowed still stops the run
            with profiler.step(step):
                metrics = train_step(s, step, logger)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                _phase(logger, "eval")  # timed as time_eval_s, apart from the weight sync before it
                last_eval = (step, s.rollout.evaluate(step))
                metrics.update(_prefixed(last_eval[1], "heldout_"))
            if logger:
                logger.log_step(metrics)
            if step == cfg.trainer.max_steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                with ctrl_c.deferred():  # one Ctrl-C lets the checkpoint land whole first
                    checkpoint(s, step)
        ctrl_c.check()
        # The final evaluation goes to summary.json, not to the last step's record, so that a run cut short
        # and resumed logs exactly the steps an uninterrupted run logs. When the last step was evaluated already
        # (max_steps a multiple of eval_every), that result is the final one: the same policy, the same seed.
        if last_eval is not None and last_eval[0] == cfg.trainer.max_steps:
            s.heldout_after = last_eval[1]
        else:
            s.heldout_after = s.rollout.evaluate(cfg.trainer.max_steps)
        summary = finish(s)
        # Leave together: a rank tearing gloo down while rank 0 still writes plots was seen to abort at exit.
        # (Only on success: after an error on one rank, a barrier would hang the others.)
        barrier(rt)
        return summary
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or ctrl_c.pressed:  # CtrlC reports the latter as the interrupt too
            _log_interrupt(logger, ctrl_c)
        elif isinstance(e, TrainingAborted) and logger:
            logger.log_event("stopped", str(e), level=logging.ERROR)
        raise
    finally:
        if logger:
            logger.close()
        s.close()
        shutdown(rt)


def train_step(s: Session, step: int, logger: RunLogger | None) -> dict:
    """One step: roll out and score (the data side), learn, sync the weights into the engine; its metrics."""
    t0 = time.perf_counter()
    _phase(logger, "rollout")
    batch = s.rollout.collect(step)

    _phase(logger, "learn")
    t_learn = time.perf_counter()
    learned = s.learner.train_on(batch)  # collective under FSDP2; {} on every rank when no rank has a sequence
    time_learn = time.perf_counter() - t_learn
    _check_update(s, step, learned, logger)

    _phase(logger, "sync")
    t_sync = time.perf_counter()
    checked = s.rollout.sync_weights(s.learner, step)  # and, every sync_check_every steps, the sync check
    time_sync = time.perf_counter() - t_sync

    step_time = time.perf_counter() - t0
    learned = dict(learned)
    trained = learned.pop("num_sequences", len(batch.sequences))  # logged as sequences_trained
    return {
        "step": step, **batch.metrics, "skipped_nonfinite": False,
        **learned,  # every metric the learner reports ({} on a step where no rank had a sequence to learn from)
        "sequences_trained": trained,
        "tokens_per_s": batch.global_response_tokens / step_time,  # sampled tokens, all ranks
        "time_learn_s": time_learn, "time_sync_s": time_sync, "time_step_s": step_time,
        "sync_bytes": s.rollout.last_sync_bytes,  # what the weight sync copied into the engine
        **_prefixed(checked, "sync_check_"),  # the check's statistics, on the steps it ran (a failure raises)
    }


def _check_update(s: Session, step: int, learned: dict, logger: RunLogger | None) -> None:
    """Count consecutive skipped (non-finite) updates and stop after trainer.nan_patience; log skipped steps."""
    if not learned.get("skipped_nonfinite"):
        s.nan_streak = 0
        if logger and not learned.get("num_sequences"):
            logger.log_event("skipped_step", "no group left to learn from (all dropped by "
                             "dynamic sampling); no update", step=step)
        return
    s.nan_streak += 1
    if logger:
        logger.log_event("nonfinite_loss", "non-finite loss or gradient; update skipped",
                         step=step, streak=s.nan_streak)
    if s.nan_streak >= s.cfg.trainer.nan_patience:
        raise TrainingAborted(f"{s.nan_streak} consecutive steps with a non-finite loss; stopping. "
                              f"The last good checkpoint is kept in {s.cfg.trainer.output_dir}/checkpoints")


def checkpoint(s: Session, step: int) -> None:
    """Collective: the HF model export (gathered to rank 0; with LoRA the adapters, plus the merged model when
    model.lora_merged_export), each rank's optimizer shards, the loop state."""
    lora = s.cfg.model.lora_rank > 0
    adapters = s.learner.adapter_state_dict() if lora else None  # rank 0 gets them; the others {}
    merged = not lora or s.cfg.model.lora_merged_export
    full_state = s.learner.full_model_state_dict() if merged else None  # rank 0 gets it, with CPU offload

    def save_model(directory: Path) -> None:
        if lora:
            save_adapters(directory, adapters, s.cfg.model, base_model=str(Path(s.model_dir).resolve()))
            s.tokenizer.save_pretrained(directory)
            if not merged:
                return
            directory = directory / MERGED_DIRNAME
        config = s.learner.model.config
        training_value, config.use_cache = config.use_cache, s.learner.exported_use_cache  # as the model came
        try:
            s.learner.model.save_pretrained(directory, state_dict=full_state, safe_serialization=True)
        finally:
            config.use_cache = training_value
        s.tokenizer.save_pretrained(directory)

    save_checkpoint(s.cfg.trainer.output_dir, step, save_model=save_model, save_shards=s.learner.save_optimizer,
                    state=s.state_dict(), config=s.cfg.to_dict(), keep_last=s.cfg.trainer.keep_last, runtime=s.rt)


def _log_interrupt(logger: RunLogger | None, ctrl_c: CtrlC) -> None:
    if logger:
        during = "; it came while a checkpoint was written, which was finished first" if ctrl_c.deferred_press else ""
        logger.log_event("interrupted", f"interrupted (Ctrl-C){during}; the last checkpoint is kept")


def _phase(logger: RunLogger | None, name: str) -> None:
    if logger:
        logger.set_phase(name)


def _prefixed(d: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in d.items() if not (isinstance(v, float) and math.isnan(v))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + help_text(argv))  # the values this command line would really use
        return 0
    if "--plan" in argv:  # the memory plan for this command line, without loading weights (memory_plan.py)
        from erpo_fast.memory_plan import main as plan_main

        return plan_main(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = config_from_cli(argv, saved_config=saved_run_config)  # --resume: the run's own config
        train(cfg)
    except UserError as e:
        print(f"erpo_fast.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"erpo_fast.train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("erpo_fast.train: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
