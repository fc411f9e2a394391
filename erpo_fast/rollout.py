"""The data side of a step: :class:`Rollout` turns a step number into the learner's :class:`StepBatch`.

It owns the prompt sampler, the ERPO history tracker, the rollout engine (and its sleep/wake life cycle) and
the verifier pool. ``collect(step)``: pick prompts -> the tracker gives each its temperature -> roll out n
samples per prompt -> score -> update the tracker -> advantages (+RA) -> DAPO dynamic sampling.

Every rank rolls out its own slice of the global batch, but the tracker sees the whole batch in the same
order on every rank (rewards are all-gathered), so it stays identical everywhere.

Names, one meaning each. A prompt has a ``row`` (its index in the training records: what the sampler draws), a
``key`` (its stable string identity, from the data), a ``tracker_id`` (the dense integer the
:class:`~erpo_fast.data.PromptIndex` gives that key: the tracker's array row, stable across resumes) and
``prompt_ids`` (its token ids, as everywhere in erpo-fast). In the learner's batch a sequence has a ``seq_key``
(its index in the batch); `erpo_fast.batch.PackedBatch.label_index` indexes the packed row.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from erpo_fast.algorithms import compute_advantages, dynamic_sampling_filter
from erpo_fast.batch import RolloutSequence, StepBatch
from erpo_fast.config import Config
from erpo_fast.data import PromptIndex, PromptRecord, PromptSampler
from erpo_fast.distributed import Runtime, all_gather_objects, broadcast_object
from erpo_fast.engines.base import verify_sync
from erpo_fast.errors import NonFiniteLogitsError, RewardFunctionError, TrainingAborted
from erpo_fast.evaluate import evaluate
from erpo_fast.prompting import decode_response, encode_prompts, stop_token_ids
from erpo_fast.rewards.pool import check_not_all_failed
from erpo_fast.tracker import HistoryTracker

SYNC_PROBE_PROMPTS = 32  # prompts the weight-sync check samples (Rollout.sample_probe)


@dataclass
class Groups:
    """Rolled-out, scored groups of this rank (B local groups of n samples)."""

    rows: list[int]  # dataset rows
    temperatures: np.ndarray  # [B] float32
    samples: list  # [B][n] Sample
    rewards: np.ndarray  # [B, n]


def step_seed(seed: int, step: int, round_: int, row: int) -> int:
    """Sampling seed of one prompt at one step: independent of batch layout and of the number of ranks."""
    return zlib.crc32(f"{seed}/{step}/{round_}/{row}".encode())


def sync_check_due(cfg: Config, step: int) -> bool:
    return bool(cfg.rollout.sync_check_every and step % cfg.rollout.sync_check_every == 0)


def check_probe(learner, probe: list[RolloutSequence], cfg: Config, step: int) -> dict:
    """The weight-sync check: the learner's log-probs of the engine's probe samples must match the engine's own
    (`erpo_fast.engines.base.verify_sync`). A stale engine (one public trainer kept sampling from the base weights
    after "syncing") stops the run. Collective under FSDP (every rank passes the same probe)."""
    ours = torch.cat(learner.compute_logprobs(probe, temperature=1.0))
    return verify_sync([lp for seq in probe for lp in seq.rollout_logprobs], ours, atol=cfg.rollout.sync_check_atol,
                       what=f"weight sync check at step {step} (rollout.sync_check_atol)")


def in_flight(state: dict, async_steps: int) -> dict:
    """A checkpoint's in-flight batches (``{"async_steps", "first", "pending"}``; none for a synchronous run).
    ValueError when it holds some from a run with another trainer.async_steps: they belong to that schedule."""
    saved = state.get("async") or {"async_steps": 0, "first": 0, "pending": []}
    if saved["pending"] and int(saved["async_steps"]) != async_steps:
        raise ValueError(f"the checkpoint holds {len(saved['pending'])} in-flight batches of a run with "
                         f"trainer.async_steps={saved['async_steps']}; resume with that setting")
    return saved


def new_tracker(cfg: Config, num_prompts: int) -> HistoryTracker:
    a = cfg.algorithm
    return HistoryTracker(num_prompts, base_temperature=a.base_temperature, temperature_step=a.temperature_step,
                          max_temperature=a.max_temperature, success_threshold=a.success_threshold, history=a.history)


def restore_tracker(cfg: Config, state: dict, train: list[PromptRecord]
                    ) -> tuple[PromptIndex, np.ndarray, HistoryTracker]:
    """The prompt index, each training row's tracker id and the tracker of a saved `Rollout.state_dict`. Prompt
    ids are stable by key: the saved index first, then any prompt new to ``train`` appended (the tracker grows)."""
    index = PromptIndex()
    index.load_state_dict(state["prompt_index"])
    tracker_ids = index.add([r.key for r in train])
    tracker = new_tracker(cfg, int(state["tracker"]["num_prompts"]))
    tracker.load_state_dict(state["tracker"])
    tracker.grow(max(tracker.num_prompts, len(index)))
    return index, tracker_ids, tracker


class Rollout:
    """Sampler, tracker, engine and verifiers behind one object; see the module docstring."""

    def __init__(self, cfg: Config, rt: Runtime, *, tokenizer, engine, rewards, train: list[PromptRecord],
                 heldout: list[PromptRecord], colocated: bool = True):
        self.cfg, self.rt, self.tokenizer, self.engine, self.rewards = cfg, rt, tokenizer, engine, rewards
        self.colocated = colocated  # False in the async rollout process: its engine has its device to itself
        self.train, self.heldout = train, heldout
        self.prompt_ids = encode_prompts(tokenizer, [r.prompt for r in train],
                                         chat_template=cfg.data.chat_template,
                                         max_length=cfg.data.max_prompt_length, origins=[r.origin for r in train])
        # The engine knows the model's generation config (its EOS list); the tokenizer may name another EOS.
        self.stop_token_ids = stop_token_ids(tokenizer, getattr(engine, "eos_token_id", None))
        self.prompt_index = PromptIndex()
        self.tracker_ids = self.prompt_index.add([r.key for r in train])  # tracker id of each dataset row
        self.tracker = new_tracker(cfg, len(self.prompt_index))
        self.sampler = PromptSampler(len(train), cfg.trainer.prompts_per_step, cfg.trainer.seed, rt.rank,
                                     rt.world_size)
        self.last_sync_bytes = 0

    # ---- one step ------------------------------------------------------------------------------------------

    def collect(self, step: int) -> StepBatch:
        """Roll out this step's prompts, update the tracker, and turn the kept groups into learner sequences."""
        cfg = self.cfg
        kept: list[tuple[Groups, np.ndarray, np.ndarray]] = []
        totals = {"time_rollout_s": 0.0, "time_score_s": 0.0, "reward_timeouts": 0, "reward_errors": 0,
                  "response_tokens": 0}
        first_round_stats = None  # residual fractions are reported for the regular batch, comparable across arms
        dropped = kept_global = 0
        rounds = 1 + (cfg.algorithm.max_refill_rounds if cfg.algorithm.dynamic_sampling else 0)
        for round_ in range(rounds):
            groups, timing = self._roll_out(self.sampler.next_batch(), step, round_)
            for k in totals:
                totals[k] += timing[k]
            stats, adv = self._update_tracker_and_advantages(groups, step)
            first_round_stats = first_round_stats or stats
            # DAPO drops groups whose advantages are all zero (with RA, all-correct groups keep a positive one).
            keep = (dynamic_sampling_filter(torch.as_tensor(adv))[0].numpy() if cfg.algorithm.dynamic_sampling
                    else np.ones(len(groups.rows), dtype=bool))
            kept.append((groups, adv * keep[:, None], keep))
            counts = all_gather_objects((int(keep.sum()), int((~keep).sum())), self.rt)
            kept_global += sum(c[0] for c in counts)
            dropped += sum(c[1] for c in counts)
            if not cfg.algorithm.dynamic_sampling or kept_global >= cfg.trainer.prompts_per_step:
                break
        # The learner runs next: the engine frees its device memory (at the level it chooses; the weight sync
        # after the update brings the new weights back). Refill rounds above reuse the awake engine.
        if self.colocated:
            self.engine.sleep()
        sequences = self._sequences(kept)
        # Counts over every rank (each rank scores its own slice); the phase times stay this rank's own.
        counts = all_gather_objects((len(sequences), totals.pop("response_tokens"), totals["reward_timeouts"],
                                     totals["reward_errors"]), self.rt)
        totals["reward_timeouts"], totals["reward_errors"] = sum(c[2] for c in counts), sum(c[3] for c in counts)
        s, n_groups = first_round_stats, max(1, first_round_stats["groups"])
        metrics = {
            "reward_mean": s["reward_mean"], "frac_all_correct": s["all_correct"] / n_groups,
            "frac_all_wrong": s["all_wrong"] / n_groups, "frac_mixed": s["mixed"] / n_groups,
            "revived": s["revived"], "groups_above_base": s["groups_above_base"],
            "temperature_mean": s["temperature_mean"], "temperature_max": s["temperature_max"],
            "groups_dropped": dropped, "rollout_rounds": len(kept), "response_len_mean": s["response_len_mean"],
            # the tracker's per-prompt history of this batch's prompts (see HistoryTracker.history_stats)
            **{k: s[k] for k in ("history_reward_mean", "correct_streak_max", "steps_since_seen_mean")},
            **totals,
        }
        return StepBatch(sequences, metrics, global_sequences=sum(c[0] for c in counts),
                         global_response_tokens=sum(c[1] for c in counts))

    def _sequences(self, kept: list[tuple[Groups, np.ndarray, np.ndarray]]) -> list[RolloutSequence]:
        """This rank's kept groups as learner sequences; DAPO trains on a full batch, not every refilled group."""
        sequences: list[RolloutSequence] = []
        groups_left = self.sampler.local_batch_size
        for groups, adv, keep in kept:
            for b, (row, group) in enumerate(zip(groups.rows, groups.samples)):
                if not keep[b]:
                    continue
                if groups_left == 0:
                    break
                groups_left -= 1
                for j, smp in enumerate(group):
                    sequences.append(RolloutSequence(
                        prompt_ids=self.prompt_ids[row], response_ids=list(smp.token_ids),
                        rollout_logprobs=list(smp.logprobs), temperature=float(groups.temperatures[b]),
                        advantage=float(adv[b, j]), seq_key=len(sequences)))
        return sequences

    def _roll_out(self, rows: list[int], step: int, round_: int) -> tuple[Groups, dict]:
        """Generate n samples per prompt at the tracker's temperature (or the base one without ERPO), and score."""
        cfg = self.cfg
        if cfg.algorithm.erpo:
            temps = self.tracker.temperatures(self.tracker_ids[rows])
        else:
            temps = np.full(len(rows), cfg.algorithm.base_temperature, dtype=np.float32)
        t0 = time.perf_counter()
        # One seed per prompt ties each prompt's randomness to (seed, step, round, prompt) alone, so a run split
        # across ranks samples exactly what one process would.
        samples = self._generate(step, [self.prompt_ids[r] for r in rows], temps.tolist(), cfg.rollout.n,
                                 cfg.rollout.max_new_tokens, stop_token_ids=self.stop_token_ids,
                                 top_k=cfg.rollout.top_k or None,
                                 top_p=cfg.rollout.top_p if cfg.rollout.top_p < 1 else None,
                                 seed=[step_seed(cfg.trainer.seed, step, round_, r) for r in rows])
        t1 = time.perf_counter()
        pairs = [(decode_response(self.tokenizer, smp.token_ids), self.train[r].answer)
                 for r, group in zip(rows, samples) for smp in group]
        keys = [self.train[r].key for r, group in zip(rows, samples) for _ in group]  # names verifier incidents
        rewards = np.asarray(self.rewards.score(pairs, keys=keys), dtype=np.float64).reshape(len(rows),
                                                                                               cfg.rollout.n)
        t2 = time.perf_counter()
        stats = self.rewards.last_stats
        # A verifier that fails on every response of the step (all ranks) is broken: stop rather than train on
        # all-zero rewards. Every rank raises together.
        counts = all_gather_objects((stats.num_scored, stats.num_failed, stats.first_failure()), self.rt)
        try:
            check_not_all_failed(self.rewards.name, sum(c[0] for c in counts), sum(c[1] for c in counts),
                                 next((c[2] for c in counts if c[2]), None),
                                 f"step {step}" + (f" (refill round {round_})" if round_ else ""))
        except RewardFunctionError as e:
            raise RewardFunctionError(f"{e}. The last checkpoint is kept in {cfg.trainer.output_dir}/checkpoints"
                                      ) from None
        timing = {"time_rollout_s": t1 - t0, "time_score_s": t2 - t1,
                  "reward_timeouts": stats.num_timeouts, "reward_errors": stats.num_errors,
                  "response_tokens": sum(len(smp.token_ids) for g in samples for smp in g)}
        return Groups(rows, temps, samples, rewards), timing

    def _update_tracker_and_advantages(self, groups: Groups, step: int) -> tuple[dict, np.ndarray]:
        """Global tracker update (identical on every rank) and this rank's group advantages."""
        a = self.cfg.algorithm
        local = (self.tracker_ids[groups.rows], groups.rewards, groups.temperatures,
                 [len(smp.token_ids) for g in groups.samples for smp in g])
        gathered = all_gather_objects(local, self.rt)
        ids = np.concatenate([g[0] for g in gathered])
        rewards = np.concatenate([g[1] for g in gathered])
        temps = np.concatenate([g[2] for g in gathered])
        lengths = [n for g in gathered for n in g[3]]
        # Groups whose prompt sat above base before this update: the denominator of the revival rate.
        above_base = int((self.tracker.temperatures(ids) > a.base_temperature).sum())
        history = self.tracker.history_stats(ids, step)
        tstats = self.tracker.update(ids, rewards, step=step)
        adv = compute_advantages(torch.as_tensor(groups.rewards), a.advantage, eps=a.adv_eps, ra=a.ra,
                                 ra_negative_reward=a.ra_negative_reward,
                                 success_threshold=a.success_threshold).numpy()
        stats = {"groups": len(ids), "all_correct": tstats.all_correct, "all_wrong": tstats.all_wrong,
                 "mixed": tstats.mixed, "revived": tstats.revived, "groups_above_base": above_base,
                 "reward_mean": float(rewards.mean()),
                 "temperature_mean": float(temps.mean()), "temperature_max": float(temps.max()),
                 "response_len_mean": float(np.mean(lengths)) if lengths else 0.0, **history}
        return stats, adv

    def _generate(self, step: int, *args, **kwargs):
        """engine.generate, turning a diverged policy (non-finite logits) into a clean stop of the run."""
        try:
            return self.engine.generate(*args, **kwargs)
        except NonFiniteLogitsError as e:
            raise self._diverged(step, e) from None

    def _diverged(self, step: int, error: Exception) -> TrainingAborted:
        return TrainingAborted(f"step {step}: the policy produced non-finite logits while sampling ({error}); it "
                               f"has diverged (learning rate too high?). The last checkpoint is kept in "
                               f"{self.cfg.trainer.output_dir}/checkpoints")

    # ---- weights, evaluation, state -------------------------------------------------------------------------

    def sync_weights(self, learner, step: int) -> dict:
        """Bring the learner's new weights into the engine (in memory; the engine wakes as it needs), and every
        ``rollout.sync_check_every`` steps check that the engine really samples from them (:func:`check_probe`).
        Returns the check's statistics ({} on other steps)."""
        self.push_weights(learner)
        if not sync_check_due(self.cfg, step):
            return {}
        return check_probe(learner, self.sample_probe(step), self.cfg, step)

    def push_weights(self, learner) -> None:
        """The learner's policy into the engine: its weights, or for a LoRA policy the merged weights of the
        adapted layers or the adapters themselves (rollout.lora_sync). Sets ``last_sync_bytes`` (what was copied)."""
        if learner.lora and self.cfg.rollout.lora_sync == "adapters":
            self.engine.update_adapters(learner.adapter_weights())
        else:
            self.engine.update_weights(learner.named_weights())
        self.last_sync_bytes = int(getattr(self.engine, "last_update_bytes", 0))

    def sample_probe(self, step: int, num_prompts: int = SYNC_PROBE_PROMPTS) -> list[RolloutSequence]:
        """The sync check's probe: the first ``num_prompts`` training prompts, each sampled once by the engine at
        T=1 (a fixed seed per step and prompt), with the engine's log-probs as ``rollout_logprobs``. Up to 16
        tokens each, and 32 prompts: in bf16 a probe of one prompt's 8 tokens can be off by 0.2 on one rounding
        outlier (bench/NOTES.md, "The weight-sync check in bf16")."""
        prompts = self.prompt_ids[:num_prompts]
        samples = self._generate(step, prompts, [1.0] * len(prompts), 1, min(16, self.cfg.rollout.max_new_tokens),
                                 stop_token_ids=[], seed=[1234 + step + 7919 * i for i in range(len(prompts))])
        return [RolloutSequence(prompt_ids=list(p), response_ids=list(g[0].token_ids),
                                rollout_logprobs=list(g[0].logprobs), temperature=1.0, advantage=0.0, seq_key=i)
                for i, (p, g) in enumerate(zip(prompts, samples))]

    def evaluate(self, step: int) -> dict:
        """Held-out mean@k / pass@k (rank 0 samples; the result is shared with every rank)."""
        cfg = self.cfg
        if not self.heldout or not cfg.trainer.eval_every:
            return {}
        result = None
        if self.rt.is_main:
            try:
                result = evaluate(self.engine, self.tokenizer, self.heldout, reward_pool=self.rewards,
                                  ks=(cfg.trainer.eval_k,), temperature=cfg.trainer.eval_temperature,
                                  max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.trainer.seed + 7919 * step,
                                  chat_template=cfg.data.chat_template,
                                  success_threshold=cfg.algorithm.success_threshold)
            except NonFiniteLogitsError as e:  # a policy diverged in this step's update: stop every rank cleanly
                result = {"aborted": str(self._diverged(step, e))}
            except RewardFunctionError as e:
                result = {"aborted": f"{e}. The last checkpoint is kept in {cfg.trainer.output_dir}/checkpoints"}
        result = broadcast_object(result, self.rt)
        if "aborted" in result:
            raise TrainingAborted(result["aborted"])
        return result

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "sampler": self.sampler.state_dict(),
                "prompt_index": self.prompt_index.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Prompt ids are stable by key: the saved index first, then any prompt new
        to this dataset appended (the tracker grows to match). Raises ValueError for a mismatched sampler."""
        in_flight(state, async_steps=0)
        self.prompt_index, self.tracker_ids, self.tracker = restore_tracker(self.cfg, state, self.train)
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        """Stop the verifier workers and shut the engine down (vLLM: now, not at garbage collection)."""
        self.rewards.close()
        close_engine = getattr(self.engine, "close", None)
        if close_engine is not None:
            close_engine()
