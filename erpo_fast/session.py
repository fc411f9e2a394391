"""Everything one training run holds, built from a Config: model, data, tracker, engine, learner, verifiers.

Kept apart from train.py so that the loop there reads top to bottom. `Session.state_dict()` is what a
checkpoint holds besides the model weights; `Session.load_state_dict()` restores it for an exact continuation.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erpo_fast import cpu_heap
from erpo_fast.async_rollout import AsyncRollout
from erpo_fast.checkpoint import (
    SHARDS_DIRNAME,
    capture_rng_state,
    latest_intact_checkpoint,
    load_checkpoint,
    restore_rng_state,
)
from erpo_fast.config import Config, ConfigError
from erpo_fast.data import PromptRecord, load_prompts, problem_records
from erpo_fast.distributed import Runtime, barrier
from erpo_fast.engines import make_engine
from erpo_fast.errors import CheckpointError, DataError
from erpo_fast.learner import Learner
from erpo_fast.lora import add_adapters, is_adapter_dir, load_adapters
from erpo_fast.memory_plan import (
    MemoryPlan,
    ModelShape,
    current_rss,
    device_budget,
    fit,
    native_shares_weights,
)
from erpo_fast.models import load_model, resolve_dtype
from erpo_fast.rewards import get_reward_fn
from erpo_fast.rewards.pool import RewardPool
from erpo_fast.rollout import Rollout

log = logging.getLogger("erpo_fast")


@dataclass
class Session:
    """The run's parts and the loop's own state. ``state_dict()`` is what a checkpoint holds besides the model
    weights and the learner's sharded optimizer state."""

    cfg: Config
    rt: Runtime
    model_dir: Path  # the run's starting model (the KL reference)
    tokenizer: object
    learner: Learner
    rollout: Rollout | AsyncRollout
    start_step: int = 0
    nan_streak: int = 0  # consecutive steps whose update was skipped for a non-finite loss
    heldout_before: dict = field(default_factory=dict)  # held-out metrics of the starting policy
    heldout_after: dict = field(default_factory=dict)  # ... and of the final one (not checkpointed)
    memory_plan: MemoryPlan | None = None  # what the start-up plan predicted (bench/bench_memory.py compares it)

    def state_dict(self) -> dict:
        return {**self.rollout.state_dict(), "learner": self.learner.state_dict(),
                "rng": capture_rng_state(),
                "loop": {"nan_streak": self.nan_streak, "heldout_before": dict(self.heldout_before)}}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore :meth:`state_dict` (ValueError when it does not fit this run, e.g. another trainer.seed)."""
        self.rollout.load_state_dict(state)
        self.learner.load_state_dict(state["learner"])
        restore_rng_state(state["rng"])
        self.nan_streak = int(state["loop"]["nan_streak"])
        self.heldout_before = dict(state["loop"]["heldout_before"])
        self.start_step = step

    def close(self) -> None:
        self.rollout.close()


def build_session(cfg: Config, rt: Runtime) -> Session:
    """Load or build every component; with trainer.resume, continue from the newest checkpoint."""
    train, heldout = load_data(cfg)
    resume_from = latest_intact_checkpoint(cfg.trainer.output_dir) if cfg.trainer.resume else None
    if cfg.trainer.resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", cfg.trainer.output_dir)
    base_dir = _base_model_dir(cfg, rt)
    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    use_lora = cfg.model.lora_rank > 0
    if ckpt and use_lora != is_adapter_dir(ckpt["model_dir"]):
        raise ConfigError(f"--resume from {resume_from}: the checkpoint holds "
                          f"{'a full model' if use_lora else 'LoRA adapters'}, but model.lora_rank is "
                          f"{cfg.model.lora_rank}; resume with the run's own setting")
    # A LoRA checkpoint holds the adapters only: the weights come from the base model, the adapters on top.
    model_dir = ckpt["model_dir"] if ckpt and not use_lora else base_dir

    device = rt.device
    if device.type == "cpu":
        cpu_heap.set_cpu_heap("release")  # before the weights: their big blocks get their own mappings too
    model, tokenizer = load_model(model_dir, dtype="float32", attn_implementation=cfg.model.attn_implementation,
                                  device=device)
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer in {model_dir} has no EOS token; responses could never stop")
    ref_model = None
    # The reference is the run's starting policy, also after a resume (LoRA: the policy with its adapters off).
    if cfg.algorithm.kl_beta > 0 and not use_lora:
        ref_model, _ = load_model(base_dir, dtype="float32", attn_implementation=cfg.model.attn_implementation,
                                  device=device)
    def attach_adapters() -> None:  # LoRA: peft's adapters in the model, the checkpoint's when resuming
        add_adapters(model, cfg.model, seed=cfg.trainer.seed)
        if ckpt:
            load_adapters(model, ckpt["model_dir"])

    # A merged-weights engine keeps a plain copy of the base; the adapters then go into the learner's model only.
    merged_copy = use_lora and (cfg.rollout.lora_sync == "merged" or cfg.trainer.async_steps > 0)
    # One copy of the weights where one suffices: a native engine in the learner's dtype on its device reads the
    # learner's parameters (the weight sync is then a no-op; the sync check still compares two code paths).
    shares = native_shares_weights(cfg, device, rt.world_size) and _fused_backend(model) and not merged_copy
    if use_lora and not merged_copy:
        attach_adapters()
    if cfg.trainer.async_steps:  # the engine, verifiers and tracker live in the rollout process (started below)
        rollout = AsyncRollout(cfg, rt, model_dir=model_dir, train=train)
        engine_copy = None
    else:
        engine = make_rollout_engine(cfg, model, model_dir, device, share=shares)
        rollout = Rollout(cfg, rt, tokenizer=tokenizer, engine=engine, rewards=make_rewards(cfg), train=train,
                          heldout=heldout)
        engine_copy = None if shares or cfg.rollout.engine != "native" else engine.model
    if merged_copy:
        attach_adapters()
    # The plan runs before the learner allocates anything (it may turn model.gradient_checkpointing on, logged);
    # on CPU its runtime term is what the process holds now (libraries, data, the tracker's JIT) besides weights.
    plan = fit(cfg, ModelShape.from_config(model.config), device=device, budget=device_budget(cfg, device),
               runtime_bytes=_runtime_rss(model, ref_model, engine_copy) if device.type == "cpu" else None,
               shares_weights=shares, distributed_world=rt.world_size)
    if device.type == "cpu":
        heap = cpu_heap.resolve(cfg.trainer.cpu_heap, peak=plan.peak, budget=plan.budget)
        if cpu_heap.set_cpu_heap(heap):
            plan.notes.append(cpu_heap.describe(cfg.trainer.cpu_heap, heap))
    if rt.is_main:
        log.info("%s", plan.table())
    learner = Learner(model, cfg.algorithm, cfg.trainer, cfg.model, device=device,
                      max_len=cfg.rollout.max_new_tokens, ref_model=ref_model)
    session = Session(cfg, rt, base_dir, tokenizer, learner, rollout, memory_plan=plan)
    if ckpt is not None:
        if ckpt["shards_dir"] is None:
            raise CheckpointError(f"{resume_from} has no sharded optimizer state ({SHARDS_DIRNAME}/); it was written "
                                  "by an older erpo-fast: resume it with that version, or start a fresh run")
        learner.load_optimizer(ckpt["shards_dir"])
        try:
            session.load_state_dict(ckpt["state"], int(ckpt["step"]))
        except ValueError as e:  # e.g. resumed with another trainer.seed: a usage error, not a crash
            raise ConfigError(f"--resume from {resume_from}: {e}") from None
        log.info("resumed from %s (step %d)", resume_from, session.start_step)
    if isinstance(rollout, AsyncRollout):
        rollout.start(learner, session.start_step)
    elif use_lora:  # an engine of its own starts from the base: give it the policy (resumed adapters)
        rollout.push_weights(learner)
    return session


def make_rewards(cfg: Config) -> RewardPool:
    """The verifier pool of data.reward (auto: math for a dataset, the built-in task's own checker otherwise)."""
    from erpo_fast.tasks.builtin import reward_name as builtin_reward

    reward_name = cfg.data.reward
    if reward_name == "auto":
        reward_name = "math" if cfg.data.path else builtin_reward(cfg.builtin)
    return RewardPool(get_reward_fn(reward_name), num_workers=cfg.data.reward_workers,
                      timeout_s=cfg.data.reward_timeout_s, name=reward_name)


def load_data(cfg: Config) -> tuple[list[PromptRecord], list[PromptRecord]]:
    if cfg.data.path is None:
        from erpo_fast.tasks.builtin import splits

        train, heldout = map(problem_records, splits(cfg.builtin))
    else:
        train = load_prompts(cfg.data.path)
        heldout = load_prompts(cfg.data.heldout_path) if cfg.data.heldout_path else []
    if len(train) < cfg.trainer.prompts_per_step:
        raise DataError(f"the training set has {len(train)} prompts, fewer than trainer.prompts_per_step="
                        f"{cfg.trainer.prompts_per_step}")
    return train, heldout


def _base_model_dir(cfg: Config, rt: Runtime) -> Path:
    """The user's model folder, or the warm-started built-in model (rank 0 builds it; the others wait)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    from erpo_fast.warm_start import builtin_model_for

    # The warm start imitates worked solutions of problems that are neither RL prompts nor held-out ones, so
    # RL starts from a policy that has learnt the task's procedure rather than one that memorised its prompts.
    if rt.is_main:
        path = builtin_model_for(cfg)
    barrier(rt)
    if not rt.is_main:
        path = builtin_model_for(cfg)  # cached by rank 0
    return path


def _runtime_rss(*models) -> int:
    """What this process holds besides the models' weights (interpreter, torch, transformers, tokenizer, data):
    measured now, once transformers is imported and the model loaded, minus the weights."""
    weights = sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters())
    return max(0, current_rss() - weights)


def _fused_backend(model) -> bool:
    from erpo_fast.engines.native import FUSED_MODEL_TYPES

    return getattr(model.config, "model_type", "") in FUSED_MODEL_TYPES


def _warn_if_bf16_is_emulated(cfg: Config, device: torch.device) -> None:
    # bf16 pays on CPUs with AVX512-BF16 or AMX (oneDNN: 3.5-4x fp32's GEMM rate, bench/NOTES.md); elsewhere
    # oneDNN emulates it and it is slower than fp32.
    if device.type == "cpu" and resolve_dtype(cfg.model.dtype, device) == torch.bfloat16 \
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("model.dtype=bfloat16 on a CPU without native bf16 matrix instructions (AVX512-BF16 or AMX): "
                    "it will run slower than float32")


def make_rollout_engine(cfg: Config, model, model_dir: Path, device: torch.device, *, share: bool = False,
                        give_model: bool = False):
    """The engine of rollout.engine. ``share``: a native engine reading the learner's own parameters;
    ``give_model``: the engine may keep ``model`` itself (the async rollout process, which has no learner)."""
    _warn_if_bf16_is_emulated(cfg, device)
    if cfg.rollout.engine == "vllm":
        from erpo_fast.engines import vllm_available

        if not vllm_available():
            raise ConfigError("--rollout vllm needs vLLM, which is not installed in this environment: pip install "
                              "'erpo-fast[vllm]' on a CUDA machine, bash scripts/vllm_env.sh for vLLM's CPU "
                              "build, or use --rollout native")
        # The KV cache only needs room for the longest prompt plus the longest response.
        lora = cfg.model if cfg.model.lora_rank and cfg.rollout.lora_sync == "adapters" else None
        # A LoRA policy never changes most of the base: its engine sleeps at level 1 (weights parked in host
        # memory) rather than 2 (weights dropped, then all re-sent).
        sleep_level = 1 if cfg.model.lora_rank else 2
        return make_engine("vllm", str(model_dir), lora=lora, sleep_level=sleep_level,
                           gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                           tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                           enforce_eager=cfg.rollout.enforce_eager, seed=cfg.trainer.seed,
                           max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                           cpu_threads=cfg.trainer.threads or None,
                           dtype=resolve_dtype(cfg.model.dtype, device))
    # Otherwise the engine samples from its own copy (bf16 engine and fp32 master weights, FSDP2 shards, or
    # rollout.share_weights off), and every step exercises the weight sync.
    engine_model = model if share or give_model else copy.deepcopy(model)
    return make_engine("native", engine_model, device=device, dtype=resolve_dtype(cfg.model.dtype, device),
                       pack_weights=cfg.rollout.pack_weights, **({"backend": "fused"} if share else {}))
