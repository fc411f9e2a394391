"""One step's data side: pick prompts, roll them out at their temperatures, score, update the tracker,
compute advantages (with RA), and apply DAPO dynamic sampling. The output is the learner's input.

Every rank rolls out its own slice of the global batch, but the tracker sees the whole batch in the same
order on every rank (rewards are all-gathered), so it stays identical everywhere.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from erpo_fast.algorithms import compute_advantages
from erpo_fast.distributed import all_gather_objects
from erpo_fast.errors import TrainingAborted
from erpo_fast.kernels import NonFiniteLogitsError
from erpo_fast.learner import RolloutSequence
from erpo_fast.prompting import decode_response


@dataclass
class Groups:
    """Rolled-out, scored groups of this rank (B local groups of n samples)."""

    positions: list[int]  # dataset positions
    temperatures: np.ndarray  # [B] float32
    samples: list  # [B][n] Sample
    rewards: np.ndarray  # [B, n]


@dataclass
class StepData:
    sequences: list[RolloutSequence]
    metrics: dict = field(default_factory=dict)


def step_seed(seed: int, step: int, round_: int, position: int) -> int:
    """Sampling seed of one prompt at one step: independent of batch layout and of the number of ranks."""
    return zlib.crc32(f"{seed}/{step}/{round_}/{position}".encode())


def generate_or_abort(s, step: int, *args, **kwargs):
    """engine.generate, turning a diverged policy (non-finite logits) into a clean stop of the run."""
    try:
        return s.engine.generate(*args, **kwargs)
    except NonFiniteLogitsError as e:
        raise diverged(s, step, e) from None


def diverged(s, step: int, error: Exception) -> TrainingAborted:
    return TrainingAborted(f"step {step}: the policy produced non-finite logits while sampling ({error}); it has "
                           f"diverged (learning rate too high?). The last checkpoint is kept in "
                           f"{s.cfg.trainer.output_dir}/checkpoints")


def roll_out(s, positions: list[int], step: int, round_: int) -> tuple[Groups, dict]:
    """Generate n samples per prompt at the tracker's temperature (or the base one without ERPO), and score."""
    cfg = s.cfg
    ids = s.tracker_ids[positions]
    if cfg.algorithm.erpo:
        temps = s.tracker.temperatures(ids)
    else:
        temps = np.full(len(positions), cfg.algorithm.base_temperature, dtype=np.float32)
    t0 = time.perf_counter()
    # One seed per prompt ties each prompt's randomness to (seed, step, round, prompt) alone, so a run split
    # across ranks samples exactly what one process would.
    samples = generate_or_abort(s, step, [s.train_prompt_ids[p] for p in positions], temps.tolist(),
                                cfg.rollout.n, cfg.rollout.max_new_tokens,
                                stop_token_ids=[s.tokenizer.eos_token_id], top_k=cfg.rollout.top_k or None,
                                top_p=cfg.rollout.top_p if cfg.rollout.top_p < 1 else None,
                                seed=[step_seed(cfg.trainer.seed, step, round_, p) for p in positions])
    t1 = time.perf_counter()
    pairs = [(decode_response(s.tokenizer, smp.token_ids), s.train[p].answer)
             for p, group in zip(positions, samples) for smp in group]
    keys = [s.train[p].key for p, group in zip(positions, samples) for _ in group]  # prompt ids, for events
    rewards = np.asarray(s.rewards.score(pairs, keys=keys), dtype=np.float64).reshape(len(positions), cfg.rollout.n)
    t2 = time.perf_counter()
    stats = s.rewards.last_stats
    timing = {"time_rollout_s": t1 - t0, "time_score_s": t2 - t1,
              "reward_timeouts": stats.num_timeouts, "reward_errors": stats.num_errors,
              "response_tokens": sum(len(smp.token_ids) for g in samples for smp in g)}
    return Groups(positions, temps, samples, rewards), timing


def collect(s, step: int) -> StepData:
    """Roll out this step's prompts, update the tracker, and turn groups into learner sequences."""
    cfg, rt = s.cfg, s.rt
    kept_groups: list[tuple[Groups, np.ndarray]] = []
    totals = {"time_rollout_s": 0.0, "time_score_s": 0.0, "reward_timeouts": 0, "reward_errors": 0,
              "response_tokens": 0}
    first_round_stats = None  # residual fractions are reported for the regular batch, comparable across arms
    dropped = 0
    kept_global = 0
    want = cfg.trainer.prompts_per_step
    for round_ in range(1 + (cfg.algorithm.max_refill_rounds if cfg.algorithm.dynamic_sampling else 0)):
        positions = s.sampler.next_batch()
        groups, timing = roll_out(s, positions, step, round_)
        for k in totals:
            totals[k] += timing[k]
        stats, adv = _update_tracker_and_advantages(s, groups, step)
        if first_round_stats is None:
            first_round_stats = stats
        if cfg.algorithm.dynamic_sampling:
            # DAPO drops groups whose advantages are all zero. With RA, all-correct groups keep a positive
            # advantage, so the test is on advantages, not on reward variance.
            keep = np.abs(adv).max(axis=1) > 0
        else:
            keep = np.ones(len(positions), dtype=bool)
        kept_groups.append((groups, adv * keep[:, None]))
        counts = all_gather_objects((int(keep.sum()), int((~keep).sum())), rt)
        kept_global += sum(c[0] for c in counts)
        dropped += sum(c[1] for c in counts)
        if not cfg.algorithm.dynamic_sampling or kept_global >= want:
            break
    # The learner runs next: the engine frees its device memory (at the level it chooses; the sync after
    # the update brings the new weights back). Refill rounds above reuse the awake engine.
    s.engine.sleep()

    sequences = []
    local_want = s.sampler.local_batch_size  # DAPO trains on a full batch, not on every refilled group
    kept_local = 0
    for groups, adv in kept_groups:
        for b, (p, group) in enumerate(zip(groups.positions, groups.samples)):
            if cfg.algorithm.dynamic_sampling and not np.abs(adv[b]).max() > 0:
                continue  # dropped by dynamic sampling
            if kept_local == local_want:
                break
            kept_local += 1
            for j, smp in enumerate(group):
                sequences.append(RolloutSequence(
                    prompt_ids=s.train_prompt_ids[p], response_ids=list(smp.token_ids),
                    rollout_logprobs=list(smp.logprobs), temperature=float(groups.temperatures[b]),
                    advantage=float(adv[b, j]), seq_key=len(sequences)))

    stats = first_round_stats
    n_groups = max(1, stats["groups"])
    metrics = {
        "reward_mean": stats["reward_mean"],
        "frac_all_correct": stats["all_correct"] / n_groups,
        "frac_all_wrong": stats["all_wrong"] / n_groups,
        "frac_mixed": stats["mixed"] / n_groups,
        "revived": stats["revived"],
        "groups_above_base": stats["groups_above_base"],
        "temperature_mean": stats["temperature_mean"],
        "temperature_max": stats["temperature_max"],
        "groups_dropped": dropped,
        "rollout_rounds": len(kept_groups),
        "response_len_mean": stats["response_len_mean"],
        **totals,
    }
    return StepData(sequences, metrics)


def _update_tracker_and_advantages(s, groups: Groups, step: int) -> tuple[dict, np.ndarray]:
    """Global tracker update (identical on every rank) and this rank's group advantages."""
    cfg = s.cfg
    local = (s.tracker_ids[groups.positions], groups.rewards, groups.temperatures,
             [len(smp.token_ids) for g in groups.samples for smp in g])
    gathered = all_gather_objects(local, s.rt)
    ids = np.concatenate([g[0] for g in gathered])
    rewards = np.concatenate([g[1] for g in gathered])
    temps = np.concatenate([g[2] for g in gathered])
    lengths = [n for g in gathered for n in g[3]]
    # Groups whose prompt sat above base before this update: the denominator of the revival rate.
    above_base = int((s.tracker.temperatures(ids) > cfg.algorithm.base_temperature).sum())
    tstats = s.tracker.update(ids, rewards, step=step)
    adv = compute_advantages(torch.as_tensor(groups.rewards), cfg.algorithm.advantage, eps=cfg.algorithm.adv_eps,
                             ra=cfg.algorithm.ra, ra_negative_reward=cfg.algorithm.ra_negative_reward,
                             success_threshold=cfg.algorithm.success_threshold).numpy()
    stats = {"groups": len(ids), "all_correct": tstats.all_correct, "all_wrong": tstats.all_wrong,
             "mixed": tstats.mixed, "revived": tstats.revived, "groups_above_base": above_base,
             "reward_mean": float(rewards.mean()),
             "temperature_mean": float(temps.mean()), "temperature_max": float(temps.max()),
             "response_len_mean": float(np.mean(lengths)) if lengths else 0.0}
    return stats, adv
