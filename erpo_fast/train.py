"""python -m erpo_fast.train: GRPO-family / ERPO training, colocated rollout engine and learner.

With no arguments it runs the embedded default (preset tiny-cpu): a tiny Qwen2 with a character tokenizer,
warm-started on the built-in arithmetic task, then trained with ERPO on a CPU. See the README for the knobs;
`--help` lists them all. Under `torchrun --nproc_per_node K` the learner is sharded with FSDP2.

One step: pick prompts -> the tracker gives each its temperature -> roll out n samples per prompt -> score
-> update the tracker, advantages (+RA), DAPO filtering -> learn (fused loss) -> sync weights into the engine
-> log, evaluate, checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch

from erpo_fast.checkpoint import CheckpointError, save_checkpoint
from erpo_fast.config import Config, ConfigError, config_from_cli, help_text
from erpo_fast.data import DataError
from erpo_fast.distributed import all_gather_objects, barrier, broadcast_object, init_runtime, shutdown
from erpo_fast.errors import TrainingAborted
from erpo_fast.evaluate import evaluate
from erpo_fast.kernels import NonFiniteLogitsError
from erpo_fast.learner import RolloutSequence
from erpo_fast.logger import RunLogger
from erpo_fast.models import ModelLoadError
from erpo_fast.profiling import StepProfiler
from erpo_fast.prompting import encode_prompt
from erpo_fast.rollout_step import collect, diverged, generate_or_abort
from erpo_fast.run_dir import RunDirError, prepare_run
from erpo_fast.run_summary import finish
from erpo_fast.session import Session, build_session

log = logging.getLogger("erpo_fast")

USAGE = "usage: python -m erpo_fast.train [--preset NAME] [--config FILE.yaml] [--section.knob VALUE ...]"


def train(cfg: Config) -> dict:
    """Run training as configured; returns the end-of-run summary."""
    rt = init_runtime(cfg.trainer.device)
    if ":" in cfg.data.reward:  # a custom verifier that does not import fails now, not after the warm start
        from erpo_fast.rewards import get_reward_fn

        get_reward_fn(cfg.data.reward)
    run_lock = prepare_run(cfg, rt)  # one live run per output_dir; no fresh run over another run's checkpoints
    try:
        return _train(cfg, rt)
    finally:
        run_lock.release()


def _train(cfg: Config, rt) -> dict:
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
        s.rewards.on_event = logger.log_event  # verifier timeouts and errors go to events.jsonl
    try:
        if s.start_step == 0:
            s.extra["heldout_before"] = run_eval(s, step=0)
        for step in range(s.start_step + 1, cfg.trainer.max_steps + 1):
            with profiler.step(step):
                metrics = train_step(s, step, logger)
            if logger and not metrics.get("sequences_trained") and not metrics.get("skipped_nonfinite"):
                logger.log_event("skipped_step", f"step {step}: no group left to learn from (all dropped by "
                                 "dynamic sampling); no update", step=step)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                metrics.update(_prefixed(run_eval(s, step), "heldout_"))
            if logger:
                logger.log_step(metrics)
            if step == cfg.trainer.max_steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                checkpoint(s, step)
        # The final evaluation goes to summary.json, not to the last step's record, so that a run cut short
        # and resumed logs exactly the steps an uninterrupted run logs.
        s.extra["heldout_after"] = run_eval(s, cfg.trainer.max_steps)
        summary = finish(s)
        # Leave together: a rank tearing gloo down while rank 0 still writes plots was seen to abort at exit.
        # (Only on success: after an error on one rank, a barrier would hang the others.)
        barrier(rt)
        return summary
    except TrainingAborted as e:
        if logger:
            logger.log_event("stopped", str(e), level=logging.ERROR)
        raise
    except KeyboardInterrupt:
        if logger:
            logger.log_event("interrupted", "interrupted (Ctrl-C); the last checkpoint is kept")
        raise
    finally:
        if logger:
            logger.close()
        s.close()
        shutdown(rt)


def train_step(s: Session, step: int, logger: RunLogger | None) -> dict:
    """Roll out, score, learn, sync; returns the step's metrics."""
    cfg = s.cfg
    t0 = time.perf_counter()
    _phase(logger, "rollout")
    data = collect(s, step)

    _phase(logger, "learn")
    t_learn = time.perf_counter()
    # train_on is collective under FSDP2: every rank calls it when any rank has sequences (dynamic sampling
    # can leave one rank empty); when none has any (every group dropped), every rank skips the update.
    counts = all_gather_objects((len(data.sequences), data.metrics.pop("response_tokens")), s.rt)
    learned = s.learner.train_on(data.sequences) if sum(c[0] for c in counts) else {}
    time_learn = time.perf_counter() - t_learn
    if learned.get("skipped_nonfinite"):
        s.extra["nan_streak"] = s.extra.get("nan_streak", 0) + 1
        if logger:
            logger.log_event("nonfinite_loss", f"step {step}: non-finite loss or gradient; update skipped",
                             step=step, streak=s.extra["nan_streak"])
        if s.extra["nan_streak"] >= cfg.trainer.nan_patience:
            raise TrainingAborted(f"{s.extra['nan_streak']} consecutive steps with a non-finite loss; stopping. "
                                  f"The last good checkpoint is kept in {cfg.trainer.output_dir}/checkpoints")
    else:
        s.extra["nan_streak"] = 0

    _phase(logger, "sync")
    t_sync = time.perf_counter()
    s.engine.update_weights(s.learner.named_weights())
    if cfg.rollout.sync_check_every and step % cfg.rollout.sync_check_every == 0:
        check_weight_sync(s, step)
    time_sync = time.perf_counter() - t_sync

    step_time = time.perf_counter() - t0
    return {
        "step": step, **data.metrics,
        "entropy": learned.get("entropy"), "kl": learned.get("kl"), "clip_frac": learned.get("clip_frac"),
        "grad_norm": learned.get("grad_norm"), "loss": learned.get("loss"), "lr": learned.get("lr"),
        "skipped_nonfinite": bool(learned.get("skipped_nonfinite", False)),
        # rollout/learner mismatch and IS-correction statistics, as train_on reports them
        **{k: v for k, v in learned.items() if k.startswith(("mismatch_", "is_weight_", "is_mask_"))},
        "sequences_trained": learned.get("num_sequences", len(data.sequences)),
        "tokens_per_s": sum(c[1] for c in counts) / step_time,  # sampled tokens, all ranks
        "time_learn_s": time_learn, "time_sync_s": time_sync, "time_step_s": step_time,
    }


def check_weight_sync(s: Session, step: int) -> float:
    """The engine must sample from the learner's weights: compare log-probs of a fixed probe at T=1.

    A stale engine (one public trainer kept sampling from the base weights after "syncing") fails loudly.
    """
    probe = encode_prompt(s.tokenizer, s.train[0].prompt, chat_template=s.cfg.data.chat_template)
    sample = generate_or_abort(s, step, [probe], [1.0], 1, min(16, s.cfg.rollout.max_new_tokens),
                               stop_token_ids=[], seed=[1234 + step])[0][0]
    ours = s.learner.compute_logprobs([RolloutSequence(probe, list(sample.token_ids), [], 1.0, 0.0, 0)],
                                      temperature=1.0)[0]
    err = float((ours - torch.tensor(sample.logprobs, dtype=ours.dtype)).abs().max())
    if not err <= s.cfg.rollout.sync_check_atol:
        raise TrainingAborted(f"weight sync check failed at step {step}: the engine's log-probs differ from the "
                              f"learner's by {err:.3g} (> rollout.sync_check_atol={s.cfg.rollout.sync_check_atol})")
    return err


def run_eval(s: Session, step: int) -> dict:
    """Held-out mean@k / pass@k (rank 0 samples; the result is shared with every rank)."""
    cfg = s.cfg
    if not s.heldout or not cfg.trainer.eval_every:
        return {}
    result = None
    if s.rt.is_main:
        try:
            result = evaluate(s.engine, s.tokenizer, s.heldout, reward_pool=s.rewards, ks=(cfg.trainer.eval_k,),
                              temperature=cfg.trainer.eval_temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                              seed=cfg.trainer.seed + 7919 * step, chat_template=cfg.data.chat_template)
        except NonFiniteLogitsError as e:  # a policy that diverged in this step's update: stop every rank cleanly
            result = {"aborted": str(diverged(s, step, e))}
    result = broadcast_object(result, s.rt)
    if "aborted" in result:
        raise TrainingAborted(result["aborted"])
    return result


def checkpoint(s: Session, step: int) -> None:
    full_state = s.learner.full_model_state_dict()  # collective under FSDP2: every rank takes part
    state = s.state_dict()
    if s.rt.is_main:
        model = s.learner.model

        def save_model(directory: Path) -> None:
            model.save_pretrained(directory, state_dict=full_state, safe_serialization=True)
            s.tokenizer.save_pretrained(directory)

        save_checkpoint(s.cfg.trainer.output_dir, step, save_model=save_model, state=state,
                        config=s.cfg.to_dict(), keep_last=s.cfg.trainer.keep_last)


def _phase(logger: RunLogger | None, name: str) -> None:
    if logger:
        logger.set_phase(name)


def _prefixed(d: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in d.items() if not (isinstance(v, float) and math.isnan(v))}


USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError, RunDirError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + help_text(argv))  # the values this command line would really use
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = config_from_cli(argv)
        train(cfg)
    except USER_ERRORS as e:
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
