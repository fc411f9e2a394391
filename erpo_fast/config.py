"""Run configuration: plain dataclasses in one tree, loaded from a preset, a YAML file and dotted CLI overrides.

Precedence, lowest first: dataclass defaults < preset (``--preset``) < YAML (``--config``) < command-line
overrides (``--algorithm.temperature_step 0.1`` or ``--algorithm.temperature_step=0.1``). Without ``--preset``,
the preset ``tiny-cpu`` applies only to runs of the built-in model and task: once ``model.path`` or
``data.path`` is set, a real run gets the bare defaults unless it names a preset itself.
Every knob has exactly one name; a few top-level flags (``--model``, ``--data``, ``--output-dir``...) are aliases
of dotted names. Every field carries its help text and allowed range in ``metadata`` so that validation errors
and ``--help`` come from one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erpo_fast import choices as C
from erpo_fast.errors import ConfigError


def knob(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A config field with its documentation and allowed range attached."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str | None = knob(None, "Local Hugging Face causal-LM directory (with tokenizer). None: the built-in "
                                  "tiny Qwen2 model with a character tokenizer, warm-started on the built-in task.")
    dtype: str = knob("auto", "Parameter/compute dtype. auto: bfloat16 on CUDA, float32 on CPU.",
                      choices=C.DTYPES)
    attn_implementation: str = knob("auto", "auto: flash_attention_2 on CUDA when installed, else sdpa.",
                                    choices=C.ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = knob(False, "Recompute activations in backward to save memory (turned on "
                                               "automatically, and logged, when the memory plan needs it).")
    liger_kernels: bool = knob(False, "Patch the model with Liger's RMSNorm/RoPE/SwiGLU kernels (CUDA only).")
    lora_rank: int = knob(0, "LoRA rank (0: off, full fine-tuning). Adapters through peft; the optimizer holds only "
                             "them and the frozen base is kept in the compute dtype.", ge=0)
    lora_alpha: float = knob(32.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank.", gt=0)
    lora_dropout: float = knob(0.0, "LoRA: dropout on the adapters' input in the training forward only (sampling, "
                                    "log-prob passes and the sync check never drop).", ge=0, lt=1)
    lora_targets: str = knob("all-linear", "LoRA: modules that get adapters: all-linear (every linear layer of the "
                                           "decoder; not the LM head), or comma-separated module names "
                                           "(q_proj,v_proj,...; lm_head only when it is not tied to the embedding).")
    lora_merged_export: bool = knob(False, "LoRA: each checkpoint also holds the merged model (model/merged/), a "
                                           "plain Hugging Face model; model/ itself holds the adapters (PEFT format).")


@dataclass
class DataConfig:
    path: str | None = knob(None, ".jsonl or .parquet with `prompt` and `answer` fields (optional `id`). "
                                  "None: the built-in task (builtin.task).")
    heldout_path: str | None = knob(None, "Held-out set for evaluation (same format). None with a built-in task: "
                                          "its disjoint held-out split; None with --data: no held-out eval.")
    reward: str = knob("auto", "Verifier: auto (the built-in task's own verifier, math-verify otherwise), "
                               "a built-in task's verifier (arithmetic, digits), math, or your own function as "
                               "module:function or path/file.py:function (see Custom rewards).")
    max_prompt_length: int = knob(512, "Prompts longer than this (in tokens) are rejected with an error.", ge=1)
    chat_template: bool = knob(True, "Wrap prompts with the tokenizer's chat template when it has one.")
    reward_workers: int = knob(2, "Verifier worker processes (0: in-process, no timeout enforcement).", ge=0)
    reward_timeout_s: float = knob(5.0, "Per-response verification timeout; a timeout scores 0 and is logged.",
                                   gt=0)


@dataclass
class BuiltinConfig:
    """The built-in task and tiny model: used only when data.path / model.path are unset (the embedded job)."""

    task: str = knob("digits", "Built-in task (when data.path is None): digits (reversed-digit addition, see "
                               "erpo_fast/tasks/digits.py) or arithmetic (answer-only integer arithmetic).",
                     choices=C.TASKS)
    levels: str | None = knob(None, "Comma-separated task levels to draw problems from (e.g. 2,3,4); None: the "
                                    "task's default levels.")
    seed: int = knob(0, "Seed of the task's train/held-out split and of the warm start, kept apart from "
                        "trainer.seed so that RL seeds share one warm-started model.", ge=0)
    num_train: int = knob(2000, "Training prompts drawn from the task.", ge=1)
    num_heldout: int = knob(200, "Held-out prompts drawn from the task (disjoint from the training prompts).", ge=1)
    hidden_size: int = knob(128, "Tiny model (when model.path is None): hidden size.", ge=8)
    layers: int = knob(4, "Tiny model: number of decoder layers.", ge=1)
    heads: int = knob(4, "Tiny model: attention heads.", ge=1)
    kv_heads: int = knob(2, "Tiny model: key/value heads (GQA).", ge=1)
    intermediate_size: int = knob(384, "Tiny model: MLP width.", ge=8)
    rope_theta: float = knob(10000.0, "Tiny model: rotary position base (RoPE theta).", gt=0)
    warm_start_steps: int = knob(400, "Supervised warm-start steps of the tiny model on worked solutions (cached; "
                                      "0 disables).", ge=0)
    warm_start_problems: int = knob(2000, "Worked solutions the warm start trains on (disjoint from the RL prompts "
                                          "and the held-out split).", ge=1)
    warm_start_lr: float = knob(3e-3, "Warm-start learning rate.", gt=0)
    warm_start_batch_size: int = knob(64, "Warm-start batch size.", ge=1)
    warm_start_weight_decay: float = knob(0.1, "Warm-start AdamW weight decay (matrices only).", ge=0)
    warm_start_restart_after: int = knob(0, "If the warm-start loss is still above warm_start_restart_loss after "
                                            "this many steps, start again from a new initialisation, within "
                                            "warm_start_steps in all (0: never).", ge=0)
    warm_start_restart_loss: float = knob(1.2, "The warm-start loss that counts as still stuck (see "
                                               "warm_start_restart_after).", gt=0)
    warm_start_target_loss: float = knob(0.0, "Stop the warm start early once its loss (mean of the last 50 steps) "
                                              "is below this, leaving RL a policy that knows the procedure but still "
                                              "errs (0: run all warm_start_steps).", ge=0)


@dataclass
class RolloutConfig:
    engine: str = knob("native", "Rollout engine: the embedded torch engine, or colocated vLLM (CUDA, or vLLM's "
                       "CPU build).",
                       choices=C.ENGINES)
    n: int = knob(8, "Responses sampled per prompt (the group size).", ge=1)
    max_new_tokens: int = knob(512, "Maximum response length in tokens.", ge=1)
    top_k: int = knob(0, "Top-k filtering after temperature (0: off).", ge=0)
    top_p: float = knob(1.0, "Top-p (nucleus) filtering after top-k (1.0: off).", gt=0, le=1)
    gpu_memory_utilization: float = knob(0.35, "vLLM: fraction of GPU memory for weights + KV cache.", gt=0, le=1)
    tensor_parallel_size: int = knob(1, "vLLM: tensor-parallel degree.", ge=1)
    enforce_eager: bool = knob(False, "vLLM: skip CUDA-graph capture.")
    share_weights: bool = knob(True, "Native engine: read the learner's own parameters when both run in the same "
                                     "dtype on the same device (one copy of the weights; the weight sync is then a "
                                     "no-op). False: the engine keeps its own copy, synced every step.")
    pack_weights: bool = knob(True, "Native engine on CPU (Llama-family models, fp32/bf16): run the decode's matmuls "
                                    "through oneDNN on copies of the weights packed at the start of each rollout "
                                    "and freed at its end (one more copy of the linear weights while sampling; "
                                    "bench/NOTES.md). False: F.linear on the weights in place.")
    sync_check_every: int = knob(10, "Check every K steps that the engine samples from the synced weights "
                                     "(0: never).", ge=0)
    sync_check_atol: float = knob(2e-2, "Tolerance of that check: the mean absolute difference of the engine's "
                                        "and the learner's log-probs over the probe (the first 32 training prompts, "
                                        "up to 16 sampled tokens each), the 5% of tokens that differ most left "
                                        "out.", gt=0)
    lora_sync: str = knob("auto", "LoRA: how the engine gets the policy. merged: the merged weights of the adapted "
                                  "layers are copied into the engine; adapters: the engine applies the adapters "
                                  "itself (native: in its forward, reading the learner's own tensors where it "
                                  "shares them; vLLM: a LoRARequest per version). auto: adapters for native, "
                                  "merged for vLLM (bench/NOTES.md, LoRA).", choices=C.LORA_SYNC_MODES)
    device: str = knob("auto", "Device of the rollout process when trainer.async_steps >= 1 (auto: cpu on a CPU "
                               "run; on CUDA the first GPU after the learner ranks', cuda:<local world size>).")
    threads: int = knob(0, "CPU threads of the rollout process when trainer.async_steps >= 1 (0: trainer.threads).",
                        ge=0)
    pin_cpus: bool = knob(True, "trainer.async_steps >= 1 on CPU, one learner process, fixed thread counts: pin the "
                                "learner to its trainer.threads cores and the rollout process (with its verifiers) "
                                "to the next rollout.threads cores, when the machine has that many.")


@dataclass
class AlgorithmConfig:
    erpo: bool = knob(True, "ERPO: raise the sampling temperature of prompts that came back all-correct.")
    base_temperature: float = knob(1.0, "Sampling temperature of a new prompt (and the floor of ERPO's rule).",
                                   gt=0)
    temperature_step: float = knob(0.1, "ERPO: +step after an all-correct group, -step after an all-wrong one.",
                                   ge=0)
    max_temperature: float = knob(1.5, "ERPO: temperature ceiling.", gt=0)
    success_threshold: float = knob(1.0, "A reward >= this counts as correct for the residual-prompt rule.")
    history: int = knob(8, "Tracker: ring-buffer length of group mean rewards kept per prompt.", ge=1)
    ra: bool = knob(False, "RA: add a virtual negative response to all-correct groups when normalising.")
    ra_negative_reward: float = knob(0.0, "RA: reward of the virtual response.")
    advantage: str = knob("grpo", "Advantage estimator.", choices=C.ADVANTAGE_METHODS)
    adv_eps: float = knob(1e-6, "Added to the standard deviation when normalising advantages.", gt=0)
    dynamic_sampling: bool = knob(False, "DAPO: drop zero-variance groups and refill the batch with new prompts.")
    max_refill_rounds: int = knob(3, "DAPO: extra rollout rounds at most to refill the batch.", ge=0)
    eps_low: float = knob(0.2, "Clip range below 1 of the importance ratio.", ge=0, lt=1)
    eps_high: float = knob(0.28, "Clip range above 1 (clip-higher: > eps_low).", ge=0)
    dual_clip: float | None = knob(None, "Dual-clip bound c (> 1) for negative advantages; None: off.", gt=1)
    kl_beta: float = knob(0.0, "Weight of the KL penalty to the reference (initial) model; 0: no reference.",
                          ge=0)
    kl_estimator: str = knob("k3", "KL estimator.", choices=C.KL_KINDS)
    loss_agg: str = knob("token_mean", "Loss aggregation: token_mean (DAPO), seq_mean_token_mean (GRPO), "
                                       "seq_mean_token_sum_norm (Dr.GRPO, divides by max_new_tokens).",
                         choices=C.LOSS_AGGREGATIONS)
    ratio_level: str = knob("token", "Importance ratio per token (PPO/GRPO) or per sequence (GSPO).",
                            choices=C.RATIO_LEVELS)
    logprob_temperature: str = knob("row", "Learner log-probs at each row's sampling temperature (row) or at "
                                           "T=1 with truncated importance sampling (one).",
                                    choices=C.LOGPROB_TEMPERATURES)
    is_level: str = knob("auto", "Truncated importance-sampling correction of rollout/learner mismatch (auto: "
                                 "token when trainer.async_steps >= 1, else none).",
                         choices=("auto", "none", *C.IS_LEVELS))
    is_clip: float = knob(2.0, "Upper bound of the truncated importance-sampling weight.", gt=0)
    is_mask: str = knob("none", "Masked importance sampling: zero the loss of tokens (token, IcePop) or of whole "
                                "sequences (sequence, geometric-mean ratio) whose learner/rollout ratio is outside "
                                "[is_mask_low, is_mask_high]; combines with is_level.",
                        choices=("none", *C.IS_MASK_LEVELS))
    is_mask_low: float = knob(0.5, "Lower bound of the masked-IS band.", gt=0, le=1)
    is_mask_high: float = knob(2.0, "Upper bound of the masked-IS band.", ge=1)
    loss_type: str = knob("ppo", "Policy-loss family: ppo (clipped surrogate; GRPO/DAPO/GSPO) or cispo (MiniMax-M1: "
                                 "clipped stop-gradient IS weight times the log-prob).", choices=C.LOSS_TYPES)
    cispo_eps_low: float = knob(1.0, "CISPO: the IS weight is clipped below at 1 - this (>= 1: no lower bound).",
                                ge=0)
    cispo_eps_high: float = knob(4.0, "CISPO: the IS weight is clipped above at 1 + this.", ge=0)
    mismatch_ratio_bound: float = knob(2.0, "Metric mismatch_ratio_outside_frac: fraction of tokens whose "
                                            "learner/rollout ratio is outside [1/c, c], c = this.", ge=1)


@dataclass
class TrainerConfig:
    output_dir: str = knob("runs/erpo", "Run directory: metrics.jsonl, checkpoints, plots.")
    max_steps: int = knob(100, "Training steps (one rollout + update each).", ge=1)
    prompts_per_step: int = knob(32, "Prompts per step (global, across ranks).", ge=1)
    micro_batch_size: int = knob(64, "Sequences per learner forward/backward at most (gradient accumulation over "
                                     "them).", ge=1)
    micro_batch_tokens: int = knob(0, "Packed tokens (prompt + response) per learner forward/backward at most, so "
                                      "that activation memory does not depend on response lengths; a longer single "
                                      "sequence runs alone (0: no token bound, micro_batch_size only).", ge=0)
    async_steps: int = knob(0, "Asynchronous off-policy training: the rollout process generates batch t+K while "
                                   "the learner trains on batch t, from the weights exactly K updates old (0: "
                                   "the synchronous colocated loop).", ge=0)
    updates_per_step: int = knob(1, "Optimizer steps per rollout batch (mini-batches; >1 makes the ratio leave 1).",
                                 ge=1)
    skip_zero_advantage: bool = knob(True, "Leave sequences whose advantage is exactly 0 (uniform groups without RA) "
                                           "out of the learner's passes: they add nothing to the gradient, which stays "
                                           "the same (the loss's normaliser still counts them); the loss's token "
                                           "metrics other than loss then cover the sequences that ran. No effect with "
                                           "algorithm.kl_beta > 0.")
    balance_ranks: bool = knob(True, "Under torchrun, hand the sequences that run out again before each update so "
                                     "that every rank gets about the same packed tokens (whole groups move, with "
                                     "their old log-probs): under FSDP2 the busiest rank sets the update's time. "
                                     "The gradient is the same, summed in another order.")
    lr: float = knob(1e-6, "Peak learning rate (AdamW).", gt=0)
    lr_schedule: str = knob("constant", "Schedule after warm-up.", choices=C.LR_SCHEDULES)
    warmup_steps: int = knob(0, "Linear learning-rate warm-up steps.", ge=0)
    min_lr_ratio: float = knob(0.1, "Final learning rate as a fraction of lr for cosine/linear.", ge=0, le=1)
    weight_decay: float = knob(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = knob(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = knob(0.999, "AdamW beta2.", ge=0, lt=1)
    optimizer_impl: str = knob("auto", "AdamW implementation: auto (fused where this torch supports the device, "
                                       "else foreach), fused, foreach or loop (torch's per-parameter reference).",
                               choices=C.OPTIMIZER_IMPLS)
    grad_clip: float = knob(1.0, "Clip the global gradient norm to this (0: off).", ge=0)
    seed: int = knob(0, "Seed of the RL run's random streams (prompt order, sampling).", ge=0)
    device: str = knob("auto", "auto: cuda when available, else cpu.", choices=C.DEVICES)
    save_every: int = knob(50, "Checkpoint every K steps (and at the end; 0: only at the end).", ge=0)
    keep_last: int = knob(2, "Checkpoints kept.", ge=1)
    eval_every: int = knob(50, "Held-out evaluation every K steps (and before/after training; 0: off).", ge=0)
    eval_k: int = knob(4, "Samples per held-out prompt for mean@k / pass@k.", ge=1)
    eval_temperature: float = knob(1.0, "Sampling temperature of held-out evaluation (0: greedy).", ge=0)
    resume: bool = knob(False, "Continue from the newest intact checkpoint in output_dir.")
    overwrite: bool = knob(False, "Start afresh in an output_dir that holds another run's checkpoints, deleting "
                                  "them (without it, or --resume, such a run exits with an error).")
    nan_patience: int = knob(3, "Stop after this many consecutive steps with a non-finite loss.", ge=1)
    threads: int = knob(0, "CPU threads for torch (0: torch's default).", ge=0)
    memory_budget_gb: float = knob(0.0, "Memory the memory plan checks the predicted peak against, in GB (0: the "
                                        "device's own: CUDA total memory, CPU available memory).", ge=0)
    cpu_heap: str = knob("auto", "CPU: freed activation blocks of 1-32 MB are unmapped (release: the resident peak "
                                 "is the plan's, every step re-faults its pages) or kept for reuse (reuse: no page "
                                 "faults, 6-12% shorter learner steps at the default job's size, the peak may exceed "
                                 "the plan by fragmentation); auto: reuse when the predicted peak is at most half "
                                 "the memory available.", choices=C.CPU_HEAP_MODES)
    profile_steps: str | None = knob(None, "Profile steps A..B ('A:B'): a torch.profiler Chrome trace in "
                                           "output_dir/profile, a per-phase table and the top operators.")


@dataclass
class LoggingConfig:
    progress: bool = knob(True, "Progress bar with phase times.")
    progress_every: int = knob(10, "When stderr is not a terminal: one plain progress line every K steps "
                                   "instead of a bar (0: none).", ge=0)
    tensorboard: bool = knob(False, "Write TensorBoard scalars to output_dir/tb (needs tensorboard).")
    wandb: bool = knob(False, "Log to Weights & Biases (needs wandb).")
    wandb_project: str = knob("erpo-fast", "W&B project name.")
    plots: bool = knob(True, "Write PNG curves to output_dir/plots at the end.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# Named starting points. `tiny-cpu` (the default) is the embedded job: built-in model and task, on a CPU laptop.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Reversed-digit addition of 4-digit numbers (erpo_fast/tasks/digits.py): a procedure, not facts to memorise.
    # Chosen for the GRPO baseline's held-out gain within 15 minutes on 2 cores (bench/NOTES.md, "Learning demo
    # trials").
    "tiny-cpu": {
        "builtin": {"num_train": 4000, "num_heldout": 200, "warm_start_steps": 3000, "warm_start_problems": 100000,
                    "warm_start_target_loss": 0.3, "warm_start_restart_after": 1000},
        "rollout": {"n": 8, "max_new_tokens": 8},
        "trainer": {"max_steps": 600, "prompts_per_step": 32, "micro_batch_size": 256, "lr": 1e-4,
                    "eval_every": 150, "save_every": 150, "output_dir": "runs/tiny-cpu", "threads": 1},
    },
    "none": {},
}
DEFAULT_PRESET = "tiny-cpu"

# Top-level flags kept short for everyday use; each is an alias of exactly one dotted knob.
ALIASES = {
    "model": "model.path",
    "data": "data.path",
    "output-dir": "trainer.output_dir",
    "max-steps": "trainer.max_steps",
    "seed": "trainer.seed",
    "resume": "trainer.resume",
    "overwrite": "trainer.overwrite",
    "rollout": "rollout.engine",
    "lr": "trainer.lr",
}

# Knobs that lived elsewhere before the built-in model and task got their own section. A saved run's config.yaml
# (a resume) is read with the new names; a YAML file or flag that uses an old name gets a one-line error naming the
# new one.
MOVED = {**{f"model.tiny_{k}": f"builtin.{k}" for k in ("hidden_size", "layers", "heads", "kv_heads",
                                                        "intermediate_size", "rope_theta")},
         **{f"model.warm_start_{k}": f"builtin.warm_start_{k}" for k in (
             "steps", "problems", "lr", "batch_size", "weight_decay", "restart_after", "restart_loss", "target_loss")},
         "data.task": "builtin.task", "data.task_levels": "builtin.levels", "data.seed": "builtin.seed",
         "data.num_train": "builtin.num_train", "data.num_heldout": "builtin.num_heldout"}

# Names other trainers (TRL, verl, HF Trainer) give knobs spelled otherwise here; difflib cannot find these
# (it suggests trainer.overwrite for trainer.learning_rate).
SYNONYMS = {"learning_rate": "lr", "num_generations": "n", "beta": "kl_beta", "lr_scheduler_type": "lr_schedule",
            "max_completion_length": "max_new_tokens", "max_prompt_len": "max_prompt_length",
            "per_device_train_batch_size": "micro_batch_size", "max_grad_norm": "grad_clip"}


# --- value parsing and validation -------------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_optional(tp) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return True, inner[0]
    return False, tp


def _coerce(name: str, value: Any, tp) -> Any:
    optional, base = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} may not be None")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if math.isnan(out):
                raise ValueError
            return out
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {getattr(base, '__name__', base)}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported type {tp}")


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    synonym = SYNONYMS.get(key.rpartition(".")[2])
    named = [v for v in valid if synonym and v.rpartition(".")[2] == synonym]
    if named:
        return f"; did you mean '{prefix}{named[0]}'?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    if len(valid) <= 12:
        return f"; valid: {', '.join(sorted(valid))}"
    return "; run with --help for the full list"


def _check_range(name: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for key, _, ok in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            allowed = " and ".join(f"{s} {meta[k]}" for k, s, _ in bounds if meta.get(k) is not None)
            raise ConfigError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _section_cls(section: str):
    return typing.get_type_hints(Config)[section]


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str = "override",
                    migrate: bool = False) -> None:
    """Set dotted keys (``{"algorithm.temperature_step": 0.2}``) or nested dicts on ``cfg``, type-checked.

    ``migrate``: read knobs under their old names (:data:`MOVED`), as a saved run's config holds them."""
    for dotted, value in _flatten(overrides).items():
        if dotted in MOVED:
            if not migrate:
                raise ConfigError(f"'{dotted}' is now '{MOVED[dotted]}' ({source})")
            dotted = MOVED[dotted]
        parts = dotted.split(".")
        if len(parts) != 2:
            valid = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
            raise ConfigError(f"unknown config key '{dotted}' ({source}){_suggest(dotted, valid)}")
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' ({source}){_suggest(section, list(SECTIONS))}")
        sub = getattr(cfg, section)
        types_ = _field_types(type(sub))
        if key not in types_:
            valid = [f"{section}.{k}" for k in types_]
            raise ConfigError(f"unknown config key '{dotted}' ({source}){_suggest(dotted, valid)}")
        setattr(sub, key, _coerce(dotted, value, types_[key]))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def validate(cfg: Config) -> Config:
    """Range-check every knob, then the cross-knob rules. Raises ConfigError with a one-line message."""
    for section in SECTIONS:
        sub = getattr(cfg, section)
        types_ = _field_types(type(sub))
        for f in dataclasses.fields(sub):
            value = _coerce(f"{section}.{f.name}", getattr(sub, f.name), types_[f.name])
            setattr(sub, f.name, value)
            _check_range(f"{section}.{f.name}", value, f.metadata)
    a, r, t = cfg.algorithm, cfg.rollout, cfg.trainer
    if a.is_level == "auto":  # off-policy correction on by default where the rollout policy is stale
        a.is_level = "token" if t.async_steps else "none"
    if t.async_steps and r.engine == "vllm" and r.tensor_parallel_size > 1:
        raise ConfigError("trainer.async_steps with rollout.tensor_parallel_size > 1 is not supported yet: the "
                          "rollout process runs one vLLM engine on one device")
    _check_with_modules(a, r)
    if r.lora_sync == "auto":
        r.lora_sync = "adapters" if r.engine == "native" and not t.async_steps else "merged"
    if cfg.model.lora_rank and t.async_steps and r.lora_sync == "adapters":
        raise ConfigError("trainer.async_steps with model.lora_rank sends the rollout process merged weights: set "
                          "rollout.lora_sync to merged (or auto)")
    if r.n < 2 and (a.advantage != "reinforce_pp" or a.dynamic_sampling):
        raise ConfigError(f"rollout.n={r.n}: group advantages ({a.advantage}) and dynamic sampling need at least "
                          f"2 responses per prompt")
    if a.eps_high < a.eps_low:
        raise ConfigError(f"algorithm.eps_high ({a.eps_high}) must be >= algorithm.eps_low ({a.eps_low}) "
                          "(clip-higher)")
    if a.logprob_temperature == "one" and a.is_level == "none":
        raise ConfigError("algorithm.logprob_temperature=one needs a truncated IS correction: set "
                          "algorithm.is_level to token or sequence")
    if t.updates_per_step > t.prompts_per_step:
        raise ConfigError(f"trainer.updates_per_step ({t.updates_per_step}) cannot exceed trainer.prompts_per_step "
                          f"({t.prompts_per_step})")
    if t.resume and t.overwrite:
        raise ConfigError("trainer.resume and trainer.overwrite contradict each other: --resume continues the run "
                          "in output_dir, --overwrite deletes it")
    from erpo_fast.rewards import REWARD_NAMES  # here: rewards.custom imports this module

    reward, builtin = cfg.data.reward, ("auto", *REWARD_NAMES)
    if reward not in builtin and (":" not in reward or not all(reward.rpartition(":")[::2])):
        raise ConfigError(f"data.reward={reward!r}: use one of {', '.join(builtin)}, or a custom verifier "
                          "as module:function or path/file.py:function")
    return cfg


def _check_with_modules(a: AlgorithmConfig, r: RolloutConfig) -> None:
    """The rules a module owns are checked by that module, not copied here: the tracker's temperature settings
    and the loss settings (LossSpec). Their ValueErrors become ConfigErrors, knob names qualified."""
    from erpo_fast.algorithms import LossSpec  # imported here: config.py itself stays free of torch and numba
    from erpo_fast.tracker import HistoryTracker

    try:
        HistoryTracker(0, base_temperature=a.base_temperature, temperature_step=a.temperature_step,
                       max_temperature=a.max_temperature, success_threshold=a.success_threshold, history=a.history)
        LossSpec.from_config(a, r.max_new_tokens)
    except ValueError as e:
        names = "|".join(f.name for f in dataclasses.fields(AlgorithmConfig))
        raise ConfigError(re.sub(rf"(?<![\w.])({names})\b", r"algorithm.\1", str(e))) from None


# --- command line ---------------------------------------------------------------------------------------

def parse_cli(argv: list[str]) -> tuple[str | None, str | None, dict[str, Any]]:
    """Split argv into (preset, yaml_path, overrides). Accepts ``--key value`` and ``--key=value``."""
    preset: str | None = None
    yaml_path: str | None = None
    overrides: dict[str, Any] = {}
    valid_flags = sorted(["config", "preset", *ALIASES] + [
        f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(_section_cls(s))])
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; options look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        dotted = ALIASES.get(name, name)
        is_bool = _flag_is_bool(dotted)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if is_bool and (nxt is None or nxt.startswith("--")):
                value = "true"  # a bare boolean flag such as --resume
            elif nxt is None or nxt.startswith("--"):
                # '--trainer.lr --seed 3' is a forgotten value, not a stray '3' (use --key=--x for such a value)
                raise ConfigError(f"option --{name} needs a value")
            else:
                value = nxt
                i += 1
        i += 1
        if name == "config":
            yaml_path = value
        elif name == "preset":
            preset = value
        elif "." in dotted and dotted.split(".")[0] in SECTIONS:
            overrides[dotted] = value
        else:
            raise ConfigError(f"unknown option --{name}{_suggest(name, valid_flags, prefix='--')}")
    return preset, yaml_path, overrides


def _flag_is_bool(dotted: str) -> bool:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        return False
    tp = _field_types(_section_cls(section)).get(key)
    return tp is not None and _is_optional(tp)[1] is bool


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and cmark is not mark:  # where the unclosed construct began
            problem += f" ({context} at line {cmark.line + 1})"
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_preset(preset: str | None, *sources: dict[str, Any] | None) -> str:
    """The preset that applies: the one named, else tiny-cpu for the built-in model and task, else none.

    The tiny-cpu preset (lr 1e-4, 12 new tokens, runs/tiny-cpu...) suits only the built-in model; applied
    silently to a --model/--data run it would train a real model at the wrong settings.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'{_suggest(preset, list(PRESETS))}")
        return preset
    for source in sources:
        for key, value in _flatten(source or {}).items():
            if key in ("model.path", "data.path") and value is not None and str(value).lower() not in ("none",
                                                                                                      "null"):
                return "none"
    return DEFAULT_PRESET


def build_config(preset: str | None = None, yaml_path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, *, saved: dict[str, Any] | None = None) -> Config:
    """Defaults < preset < YAML < overrides, then validation (see resolve_preset for the default preset).

    ``saved``: a resumed run's own config (its checkpoint's config.yaml) replaces defaults and preset: the preset
    it ran with is already in it, so only a preset named here applies on top, then YAML and overrides.
    """
    cfg = Config()
    from_yaml = load_yaml(yaml_path) if yaml_path is not None else None
    if saved is not None:
        apply_overrides(cfg, saved, source="the checkpoint's config.yaml", migrate=True)
        cfg.trainer.overwrite = False  # the saved run may have started with --overwrite; this one resumes
        name = preset if preset is not None else "none"
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'{_suggest(name, list(PRESETS))}")
    else:
        name = resolve_preset(preset, from_yaml, overrides)
    apply_overrides(cfg, PRESETS[name], source=f"preset {name}")
    if from_yaml is not None:
        apply_overrides(cfg, from_yaml, source=str(yaml_path))
    if overrides:
        apply_overrides(cfg, overrides, source="command line")
    return validate(cfg)


def config_from_cli(argv: list[str], saved_config: typing.Callable[[str], dict | None] | None = None) -> Config:
    """The run's config from the command line. With ``--resume`` and ``saved_config`` (output_dir -> the newest
    checkpoint's saved config, or None), the run continues with its own config: ``--resume --output-dir D`` alone
    suffices, and flags given on top override it."""
    preset, yaml_path, overrides = parse_cli(argv)
    cfg = build_config(preset, yaml_path, overrides)
    if cfg.trainer.resume and saved_config is not None:
        saved = saved_config(cfg.trainer.output_dir)
        if saved is not None:
            output_dir = cfg.trainer.output_dir  # where it was found, even if the run folder has moved since
            cfg = build_config(preset, yaml_path, {**overrides, "trainer.output_dir": output_dir,
                                                   "trainer.resume": True}, saved=saved)
    return cfg


def help_text(argv: list[str] | None = None) -> str:
    """Every knob with the value a run given ``argv`` would use (preset, YAML and overrides applied), its
    default when that differs, and its documentation: ``--help`` shows what will really run."""
    argv = [a for a in (argv or []) if a not in ("-h", "--help")]
    note = ""
    try:
        preset, yaml_path, overrides = parse_cli(argv)
        from_yaml = load_yaml(yaml_path) if yaml_path is not None else None
        name = resolve_preset(preset, from_yaml, overrides)
        cfg = build_config(preset, yaml_path, overrides)
    except ConfigError as e:
        note = f"\n(the other arguments do not form a valid run: {e}; showing the bare defaults)"
        name, cfg = "none", Config()
    if note or preset is not None:
        why = ""
    elif name != "none":
        why = " (the default for the built-in model and task)"
    else:
        why = " (--model/--data given: the built-in model's preset does not apply; --preset NAME applies one)"
    lines = [f"effective values with these arguments; preset: {name}{why}{note}",
             "aliases: " + ", ".join(f"--{a} = --{d}" for a, d in ALIASES.items())]
    for section in SECTIONS:
        cls = _section_cls(section)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            origin = "" if value == f.default else f", default {f.default!r}"
            lines.append(f"  --{section}.{f.name} {value!r}{origin}: {f.metadata['help']}")
    return "\n".join(lines)


def markdown_reference() -> str:
    """The README's configuration reference, generated from the dataclasses (tests keep the two in sync)."""
    lines = []
    for section in SECTIONS:
        cls = _section_cls(section)
        lines += [f"**`{section}`**", "", "| knob | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            allowed = _allowed_text(f.metadata)
            lines.append(f"| `{section}.{f.name}` | `{f.default!r}` | {f.metadata['help']}{allowed} |")
        lines.append("")
    return "\n".join(lines)


def preset_reference(name: str = DEFAULT_PRESET) -> str:
    """The README's table of what a preset sets, generated from PRESETS (tests keep the two in sync)."""
    lines = [f"| knob | `{name}` | default |", "|---|---|---|"]
    for dotted, value in _flatten(PRESETS[name]).items():
        section, key = dotted.split(".")
        default = next(f.default for f in dataclasses.fields(_section_cls(section)) if f.name == key)
        lines.append(f"| `{dotted}` | `{value!r}` | `{default!r}` |")
    return "\n".join(lines) + "\n"


def readme_blocks() -> dict[str, str]:
    """Generated README sections, by marker: ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``."""
    return {"config-reference": markdown_reference(), "preset-reference": preset_reference()}


def write_readme(path: Path) -> None:
    """Replace each generated section of the README at ``path`` with its current text."""
    text = path.read_text()
    for name, body in readme_blocks().items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = text.split(begin)
        text = f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"
    path.write_text(text)


def _allowed_text(meta: dict) -> str:
    if meta.get("choices"):
        return " One of: " + ", ".join(f"`{c}`" for c in meta["choices"]) + "."
    parts = [f"{sym} {meta[k]}" for k, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
             if meta.get(k) is not None]
    return f" Range: {', '.join(parts)}." if parts else ""


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    write_readme(readme)
    print(f"regenerated the configuration and preset tables in {readme}")
