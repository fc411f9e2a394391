"""The memory plan: what one training run holds, predicted from the model's config and the run's knobs.

At start-up the trainer prints it as one short table; ``python -m erpo_fast.train --plan ...`` prints it and exits
(a config-only model folder is enough: no weights are loaded, the parameter count comes from instantiating the
architecture on the meta device). Terms, in bytes:

- **weights / gradients / optimizer**: fp32 master weights, fp32 gradients, AdamW's two fp32 moments. With LoRA
  (``model.lora_rank``): the frozen base in the compute dtype (fp32 under FSDP2, sharded), and gradients and AdamW
  state of the adapters only (:func:`lora_params`); no reference copy for the KL term (the base is the reference).
- **activations**: what autograd saves for one micro-batch (counted from the saved tensors of transformers'
  Llama-family decoder under our packed attention and, for the model types it covers, ``lean_layers``; see
  ``_saved_per_token``), plus the backward's transients.
  Packed tokens come from simulating :func:`erpo_fast.batch.micro_batches` on full-length sequences.
- **loss workspace**: the fused loss's ``[rows, V]`` logits chunk (CPU: ``chunk_rows`` rows) and, with a tied
  embedding, its ``[V, H]`` weight gradient, which autograd holds through the backward until the embedding's
  share joins it.
- **engine weights**: 0 when the native engine reads the learner's parameters (same dtype and device), else one
  more copy in the engine's dtype; vLLM: inside its ``gpu_memory_utilization`` share.
- **KV cache**: the native engine's static cache, every row at the longest prompt plus ``max_new_tokens``; on CPU
  (Llama family, n > 1) each prompt's part once for its n rows (``engines/prompt_kv``).
- **engine packed weights**: on CPU the native engine samples through oneDNN copies of its linear weights
  (``rollout.pack_weights``), which exist only while it samples.

The peak is the resident part plus the larger of the two phases: rollout (engine KV cache and decode workspace)
and learning (gradients, activations, loss workspace). Where the peak exceeds the memory available the plan says
which knob fixes it, and turns activation checkpointing on itself when that alone suffices (:func:`fit`).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch

from erpo_fast.batch import RolloutSequence, micro_batches, packed_length
from erpo_fast.config import Config, ConfigError
from erpo_fast.lean_layers import has_lean_layers
from erpo_fast.packed_attention import shares_prompt_attention

log = logging.getLogger("erpo_fast")

GB = 1e9
# Resident before the model exists (interpreter, torch, transformers, tokenizer; CUDA: the context). Used when the
# plan cannot measure the running process (CUDA, or a plan for another device).
RUNTIME_BYTES = {"cpu": int(0.55 * GB), "cuda": int(0.6 * GB)}


@dataclass
class ModelShape:
    """What the plan needs to know about the architecture (from a Hugging Face config; no weights)."""

    params: int  # unique parameters (a tied embedding counts once)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False  # input and output embeddings share one weight
    lean: bool = False  # the learner gives its norms and SwiGLU the lean backward (erpo_fast.lean_layers)
    fused_engine: bool = False  # the native engine's fused backend runs this model type (Llama family)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        from transformers import AutoModelForCausalLM

        from erpo_fast.engines.native import FUSED_MODEL_TYPES

        with torch.device("meta"):  # exact parameter count of any architecture, no memory
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params=params, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), lean=has_lean_layers(config),
                   fused_engine=getattr(config, "model_type", "") in FUSED_MODEL_TYPES)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_weights(self) -> int:
        """Elements of every linear's weight matrix (q/k/v, o, gate/up, down per layer, and the LM head)."""
        h, q = self.hidden, self.heads * self.head_dim
        return self.layers * (h * (q + 2 * self.kv_width) + q * h + 3 * h * self.intermediate) + self.vocab * h

    @property
    def decoder_params(self) -> int:
        """Parameters the decoder layers' linears use (the embedding and LM head excluded)."""
        return self.params - self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass
class MemoryPlan:
    """Predicted bytes per term (see the module docstring); ``notes`` say what was assumed or decided."""

    device: str
    compute_dtype: torch.dtype
    engine: str
    shares_weights: bool
    checkpointing: bool
    micro_batch_tokens: int  # packed tokens of the largest micro-batch
    terms: dict[str, int]
    phases: dict[str, int]
    budget: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def table(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        lines = [f"memory plan ({self.device}, compute {dtype}, engine {self.engine}"
                 f"{', one shared copy of the weights' if self.shares_weights else ''}"
                 f"{', activation checkpointing' if self.checkpointing else ''}):"]
        for name, value in self.terms.items():
            lines.append(f"  {name:<50}{value / GB:9.2f} GB")
        for name, value in self.phases.items():
            lines.append(f"  {'peak, ' + name + ' phase':<50}{value / GB:9.2f} GB")
        verdict = ""
        if self.budget is not None:
            verdict = f" of {self.budget / GB:.2f} GB available: " + ("fits" if self.fits else "DOES NOT FIT")
        lines.append(f"  {'predicted peak':<50}{self.peak / GB:9.2f} GB{verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _saved_per_token(shape: ModelShape, *, act_bytes: int, res_bytes: int, autocast: bool = False,
                     fold_down: bool = False) -> tuple[float, float, float]:
    """(bytes per packed token, per attention query, per attention key) saved by one decoder layer for backward.

    Counted from autograd's saved tensors of transformers' Llama-family layer (tests/test_memory_plan.py checks
    the count against the real saved tensors): each RMSNorm keeps its input, the normalised value and its output
    (the next linear's input) in fp32 (``res_bytes``), the o_proj input (``act_bytes``), the MLP gate, up,
    activation and product (4 x intermediate); packed attention keeps the gathered q block, the sdpa output and a
    log-sum-exp per head for each query slot, and the gathered k and v blocks for each key slot (padding
    included: see ``PackedLayout.query_slots``). Under autocast each linear also keeps the bf16 cast of its fp32
    input (the two norm outputs). With ``shape.lean`` (erpo_fast.lean_layers) a norm does not keep the normalised
    value and the MLP not the activation, nor (``fold_down``: ``folds_down_projection``) the down projection's input.
    """
    h, i = shape.hidden, shape.intermediate
    norm_values, mlp_values = (4, 2 if fold_down else 3) if shape.lean else (6, 4)
    dense = norm_values * h * res_bytes + h * act_bytes + mlp_values * i * act_bytes + (
        2 * h * act_bytes if autocast else 0)
    return dense, 2 * h * act_bytes + shape.heads * 4, 2 * shape.kv_width * act_bytes


def saved_activation_bytes(shape: ModelShape, *, packed: int, queries: int, keys: int, trained: int,
                           act_bytes: int, checkpointing: bool, autocast: bool = False,
                           fold_down: bool | None = None, head_bytes: int | None = None) -> int:
    """Bytes autograd holds after the forward of one micro-batch: ``packed`` row tokens, ``queries`` and ``keys``
    attention slots (``PackedLayout.query_slots``/``key_slots``; without packed attention both are the sum of
    prompt + response over the sequences), ``trained`` response tokens. With checkpointing each layer keeps
    only its input (fp32 residual stream). ``autocast`` (a compute dtype below the fp32 master weights, one
    process): every linear also keeps the cast copy of its weight until its backward, so the decoder's weights
    are held once more in the compute dtype (with checkpointing only while a layer re-runs: see plan_memory).
    ``fold_down``: whether lean_layers folds the MLP's down projection (default: lean and no autocast).
    ``head_bytes``: bytes per element of the hidden rows the loss takes (``Learner.head_dtype``; default
    ``act_bytes``)."""
    fold_down = shape.lean and not autocast if fold_down is None else fold_down
    dense, per_query, per_key = _saved_per_token(shape, act_bytes=act_bytes, res_bytes=4, autocast=autocast,
                                                 fold_down=fold_down)
    final_norm = packed * (1 if shape.lean else 2) * shape.hidden * 4
    final = final_norm + trained * shape.hidden * (head_bytes or act_bytes)  # the final norm; the loss's hidden rows
    casts = shape.decoder_params * act_bytes if autocast else 0
    if checkpointing:
        return int(packed * shape.hidden * 4 * shape.layers + final)
    return int((packed * dense + queries * per_query + keys * per_key) * shape.layers + final + casts)


def _largest_micro_batch(cfg: Config, prompt_tokens: int, share_prompts: bool, share_prompt_attention: bool
                         ) -> tuple[int, int, int, int]:
    """(packed tokens, attention queries, attention keys, trained tokens) of the largest micro-batch of a
    full-length step (every response ``max_new_tokens`` long: no padding inside an attention block)."""
    n, new = cfg.rollout.n, cfg.rollout.max_new_tokens
    seqs = []
    for p in range(cfg.trainer.prompts_per_step):  # every response full length: the worst case
        prompt = [p] * prompt_tokens
        seqs += [RolloutSequence(prompt, [0] * new, [], 1.0, 0.0, p * n + j) for j in range(n)]
    best = (0, 0, 0, 0)
    for idx in micro_batches(seqs, max_sequences=cfg.trainer.micro_batch_size,
                             max_tokens=cfg.trainer.micro_batch_tokens, share_prompts=share_prompts):
        queries = keys = 0
        for _, run in groupby(idx, key=lambda i: seqs[i].prompt_ids):  # a group's samples in this micro-batch
            k = len(list(run))
            if share_prompts and share_prompt_attention and shares_prompt_attention(prompt_tokens, new, k):
                queries += prompt_tokens + k * new  # the prompt's attention once, then each response's queries
                keys += prompt_tokens + k * (prompt_tokens + new)
            else:
                queries += k * (prompt_tokens + new)
                keys += k * (prompt_tokens + new)
        chunk = [seqs[i] for i in idx]
        best = max(best, (packed_length(chunk, share_prompts=share_prompts), queries, keys, len(chunk) * new))
    return best


def _own_copy_reason(cfg: Config, engine_dtype: torch.dtype, distributed_world: int) -> str:
    if cfg.trainer.async_steps:
        return "it lives in the async rollout process"
    if not cfg.rollout.share_weights:
        return "rollout.share_weights is off"
    if engine_dtype != torch.float32:
        return f"it runs {str(engine_dtype).removeprefix('torch.')}, the learner fp32 master weights"
    if distributed_world > 1:
        return "the learner is sharded (FSDP2)"
    return "this model type has no fused engine backend (the hf backend runs the learner's modules)"


def plan_memory(cfg: Config, shape: ModelShape, *, device: torch.device, prompt_tokens: int | None = None,
                runtime_bytes: int | None = None, budget: int | None = None, shares_weights: bool | None = None,
                checkpointing: bool | None = None, distributed_world: int = 1) -> MemoryPlan:
    """The plan for ``cfg`` on ``device``. ``prompt_tokens``: the longest prompt (default
    ``data.max_prompt_length``); ``runtime_bytes``: what the process holds before the model (default a constant
    per device type); ``budget``: the memory to fit in (None: no verdict)."""
    from erpo_fast.kernels.fused_linear.chunked import ROW_CHUNK_BYTES, chunk_rows
    from erpo_fast.models import resolve_dtype

    compute = resolve_dtype(cfg.model.dtype, device)
    engine_dtype = compute
    act_bytes = torch.empty((), dtype=compute).element_size()
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    prompt_tokens = cfg.data.max_prompt_length if prompt_tokens is None else prompt_tokens
    new = cfg.rollout.max_new_tokens
    native = cfg.rollout.engine == "native"
    if shares_weights is None:
        shares_weights = native_shares_weights(cfg, device, distributed_world)
    notes = []
    p = shape.params
    shard = max(1, distributed_world)  # FSDP2 shards weights, gradients and optimizer state
    adapters = lora_params(cfg, shape)
    if adapters:
        base_bytes = 4 if shard > 1 else act_bytes  # FSDP2's shards keep one dtype: fp32
        weights = base_bytes * p // shard + 4 * adapters // shard
        trained, reference = adapters, 0
        names = (f"weights (frozen base {'fp32' if shard > 1 else str(compute).removeprefix('torch.')}, "
                 f"LoRA {adapters / 1e6:.1f}M fp32)", "gradients (fp32, adapters)", "optimizer state (AdamW, adapters)")
    else:
        weights, trained, reference = 4 * p // shard, p, (4 * p // shard if cfg.algorithm.kl_beta > 0 else 0)
        names = ("weights (fp32 master)", "gradients (fp32)", "optimizer state (AdamW, fp32)")
    grads, optimizer = 4 * trained // shard, 8 * trained // shard
    terms = dict(zip(names, (weights, grads, optimizer)))
    if reference:
        terms["reference model (fp32, for the KL term)"] = reference

    # Activations: packed attention (sdpa) shares a group's prompt; other attention runs every sequence whole.
    share = cfg.model.attn_implementation in ("auto", "sdpa") and not (
        cfg.model.attn_implementation == "auto" and device.type == "cuda")
    # A shared prompt's attention runs once where PackedLayout does that by default (CPU).
    packed, queries, keys, trained_tokens = _largest_micro_batch(cfg, prompt_tokens, share, device.type == "cpu")
    # FSDP2 casts through its mixed-precision policy; a LoRA base is in the compute dtype already (no cast copies).
    autocast = compute != torch.float32 and distributed_world <= 1 and not adapters
    # lean_layers folds the down projection where the learner runs no autocast and LoRA leaves that projection alone
    fold_down = shape.lean and not (compute != torch.float32 and distributed_world <= 1) and not (
        adapters and "down_proj" in _lora_targets(cfg))
    # The loss takes the fp32 master head on CPU, one process, no LoRA (Learner.head_dtype): nothing cast for it.
    fp32_head = device.type == "cpu" and shard == 1 and not adapters
    saved = saved_activation_bytes(shape, packed=packed, queries=queries, keys=keys, trained=trained_tokens,
                                   act_bytes=act_bytes, checkpointing=ckpt, autocast=autocast, fold_down=fold_down,
                                   head_bytes=4 if fp32_head else act_bytes)
    dense, per_query, per_key = _saved_per_token(shape, act_bytes=act_bytes, res_bytes=4, autocast=autocast,
                                                 fold_down=fold_down)
    casts = shape.decoder_params * act_bytes / shape.layers if autocast else 0  # one layer's weights, cast
    recompute = (packed * dense + queries * per_query + keys * per_key + casts) if ckpt else 0  # one layer re-runs
    backward = packed * (3 * shape.intermediate + 2 * shape.hidden) * act_bytes  # one layer's gradient transients
    activations = saved + recompute + backward
    terms[f"activations ({packed} tokens per micro-batch)"] = int(activations)
    rows = chunk_rows(shape.vocab, compute) if device.type == "cpu" else max(1, ROW_CHUNK_BYTES // (
        shape.vocab * act_bytes))
    # The CPU loss computes in fp32 whatever the compute dtype (kernels/fused_linear/chunked.py): its chunk buffer
    # and scratch tile are fp32 there.
    loss_bytes = 4 if device.type == "cpu" else act_bytes
    workspace = min(trained_tokens, rows) * shape.vocab * loss_bytes * 2
    if shape.tied and not adapters:  # the loss's [V, H] weight gradient waits through the backward for the embedding's
        workspace += shape.vocab * shape.hidden * 4
    # The LM head's weight cast to the compute dtype, held by the loss until its backward (not where the loss takes
    # the fp32 master, and a LoRA base is in that dtype already); a LoRA-adapted head: its effective weight
    # W + s B A, materialised for the fused loss.
    if compute != torch.float32 and not fp32_head and not (adapters and shard == 1):
        workspace += shape.vocab * shape.hidden * act_bytes
    if adapters and "lm_head" in _lora_targets(cfg):
        workspace += shape.vocab * shape.hidden * act_bytes
    terms["loss workspace (logits chunk, LM-head gradient)"] = workspace

    # The async rollout process samples the global batch; colocated engines each their rank's share.
    rows_total = cfg.trainer.prompts_per_step * cfg.rollout.n // (1 if cfg.trainer.async_steps else shard)
    if native:
        engine_weights = 0 if shares_weights else p * torch.empty((), dtype=engine_dtype).element_size()
        if not shares_weights:
            notes.append("the native engine keeps its own copy of the weights: "
                         + _own_copy_reason(cfg, engine_dtype, distributed_world))
        terms["engine weights"] = engine_weights
        if _shares_prompt_kv(cfg, shape, device):  # a prompt's k/v once for its n rows (engines/prompt_kv)
            prompts_total = rows_total // cfg.rollout.n
            kv = 2 * shape.layers * shape.kv_width * (prompts_total * prompt_tokens + rows_total * new) * act_bytes
            terms[f"engine KV cache ({prompts_total} prompts x {prompt_tokens}, {rows_total} rows x {new} tokens)"] = kv
        else:
            kv = 2 * shape.layers * rows_total * shape.kv_width * (prompt_tokens + new) * act_bytes
            terms[f"engine KV cache ({rows_total} rows x {prompt_tokens + new} tokens)"] = kv
        # Decode: [rows, V] logits and the sampler's row-wise temporaries; prefill: one prompt's MLP activations.
        workspace = 3 * rows_total * shape.vocab * 4 + cfg.trainer.prompts_per_step * prompt_tokens * (
            2 * shape.intermediate + 4 * shape.hidden) * act_bytes
        terms["engine decode workspace"] = workspace
        rollout_transient = kv + workspace
        if _packs_engine_weights(cfg, shape, device, engine_dtype):
            packed_bytes = shape.linear_weights * act_bytes
            terms["engine packed weights (oneDNN, while sampling)"] = packed_bytes
            rollout_transient += packed_bytes
    else:
        share_bytes = 0
        if budget is not None:
            share_bytes = int(cfg.rollout.gpu_memory_utilization * budget)
        terms["vLLM share (weights + KV, asleep while learning)"] = share_bytes
        engine_weights, rollout_transient = 0, share_bytes
        notes.append("vLLM keeps its own bf16 copy of the weights inside its gpu_memory_utilization share")
        if adapters:
            notes.append(f"LoRA: vLLM sleeps at level 1, parking its {p * act_bytes / GB:.1f} GB of weights in host "
                         "memory while the learner runs")

    runtime = RUNTIME_BYTES.get(device.type, RUNTIME_BYTES["cpu"]) if runtime_bytes is None else runtime_bytes
    terms = {"runtime (torch, libraries)": runtime, **terms}
    resident = runtime + weights + optimizer + engine_weights + reference
    learn = grads + int(activations) + terms["loss workspace (logits chunk, LM-head gradient)"]
    phases = {"rollout": resident + rollout_transient, "learning": resident + learn}
    if cfg.trainer.async_steps:
        phases = _async_phases(cfg, terms, device, p * torch.empty((), dtype=engine_dtype).element_size(),
                               resident - engine_weights + learn, engine_weights + rollout_transient + runtime, notes)
    return MemoryPlan(device=str(device), compute_dtype=compute, engine=cfg.rollout.engine,
                      shares_weights=native and shares_weights, checkpointing=ckpt, micro_batch_tokens=packed,
                      terms=terms, phases=phases, budget=budget, notes=notes)


def _shares_prompt_kv(cfg: Config, shape: ModelShape, device: torch.device) -> bool:
    """Whether the native engine keeps each prompt's k/v once for its samples (its fused backend on CPU, n > 1)."""
    return shape.fused_engine and device.type == "cpu" and cfg.rollout.n > 1


def _packs_engine_weights(cfg: Config, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the native engine packs its linear weights for oneDNN while it samples (engines/onednn_weights)."""
    from erpo_fast.engines.onednn_weights import onednn_available

    return (cfg.rollout.pack_weights and shape.fused_engine and device.type == "cpu"
            and onednn_available(dtype))


def _async_phases(cfg: Config, terms: dict, device: torch.device, slot_bytes: int, learner: int, rollout: int,
                  notes: list) -> dict:
    """trainer.async_steps >= 1: the rollout process (its engine and its own runtime) runs while the learner
    learns, beside K weight slots; on CPU they share the machine's memory, on CUDA it has a GPU of its own."""
    k = cfg.trainer.async_steps
    terms[f"async weight slots ({k} x engine dtype, shared)"] = k * slot_bytes
    if device.type == "cpu":
        terms["async rollout process runtime"] = terms["runtime (torch, libraries)"]
        notes.append("async: the rollout process samples while the learner learns, so both phases count at once")
        return {"async (rollout and learning at once)": learner + rollout + k * slot_bytes}
    notes.append(f"async: the engine, its KV cache and the weight slots live on the rollout process's GPU "
                 f"(rollout.device); this plan is the learner's GPU; the rollout GPU holds about "
                 f"{(rollout + k * slot_bytes) / GB:.2f} GB")
    return {"learning": learner}


LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_targets(cfg: Config) -> tuple[str, ...]:
    from erpo_fast.lora import target_modules

    targets = target_modules(cfg.model)
    return LORA_ALL_LINEAR if targets == "all-linear" else tuple(targets)


def lora_params(cfg: Config, shape: ModelShape) -> int:
    """Adapter parameters of ``model.lora_*`` on a Llama-family shape: r x (in + out) per adapted projection
    (0 without LoRA). Targets other than the projections below and lm_head count nothing (the run itself checks
    that they exist)."""
    r = cfg.model.lora_rank
    if not r:
        return 0
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_width
    per_layer = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
                 "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    targets = _lora_targets(cfg)
    total = shape.layers * sum(size for name, size in per_layer.items() if name in targets)
    if "lm_head" in targets:
        total += shape.hidden + shape.vocab
    return r * total


def native_shares_weights(cfg: Config, device: torch.device, world: int = 1) -> bool:
    """Whether the native engine can read the learner's parameters: same dtype (fp32 master) and device, not
    sharded, and the fused backend (its decode loop never runs the learner's modules, whose mode and attention
    implementation the learner sets)."""
    from erpo_fast.models import resolve_dtype

    return (cfg.rollout.engine == "native" and cfg.rollout.share_weights and world == 1
            and not cfg.trainer.async_steps and resolve_dtype(cfg.model.dtype, device) == torch.float32)


def device_budget(cfg: Config, device: torch.device) -> int | None:
    """``trainer.memory_budget_gb``, else the device's memory: CUDA total, CPU available (None if unknown)."""
    if cfg.trainer.memory_budget_gb > 0:
        return int(cfg.trainer.memory_budget_gb * GB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + current_rss()
    except OSError:
        pass
    return None


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def fit(cfg: Config, shape: ModelShape, *, device: torch.device, budget: int | None, **kwargs) -> MemoryPlan:
    """The plan, after turning activation checkpointing on when the plan needs it and that suffices (logged).

    Raises ConfigError naming the knobs that would fix a predicted out-of-memory on CUDA; on CPU (where the OS
    can swap or other processes free memory) a predicted overflow is a warning.
    """
    plan = plan_memory(cfg, shape, device=device, budget=budget, **kwargs)
    if plan.fits is not False:
        return plan
    if not plan.checkpointing:
        with_ckpt = plan_memory(cfg, shape, device=device, budget=budget, checkpointing=True, **kwargs)
        if with_ckpt.fits:
            cfg.model.gradient_checkpointing = True
            log.info("memory plan: %.2f GB predicted without activation checkpointing, %.2f GB available; "
                     "turned model.gradient_checkpointing on (%.2f GB predicted)", plan.peak / GB, budget / GB,
                     with_ckpt.peak / GB)
            with_ckpt.notes.append("activation checkpointing turned on by the plan")
            return with_ckpt
        plan = with_ckpt
    advice = _advice(cfg, plan, shape, device, budget, **kwargs)
    message = (f"the memory plan predicts a peak of {plan.peak / GB:.2f} GB, more than the {budget / GB:.2f} GB "
               f"available on {device}; {advice}")
    if device.type == "cuda":
        raise ConfigError(message)
    log.warning(message)
    return plan


def _advice(cfg: Config, plan: MemoryPlan, shape: ModelShape, device: torch.device, budget: int, **kwargs) -> str:
    """The knob changes that would make the plan fit, in the order worth trying."""
    import copy

    fixes = []
    for tokens in (4096, 2048, 1024, 512, 256):
        trial = copy.deepcopy(cfg)
        trial.trainer.micro_batch_tokens = tokens
        if plan_memory(trial, shape, device=device, budget=budget, checkpointing=True, **kwargs).fits:
            fixes.append(f"--model.gradient_checkpointing true --trainer.micro_batch_tokens {tokens}")
            break
    if cfg.rollout.engine == "vllm":
        for share in (0.3, 0.25, 0.2, 0.15, 0.1):
            trial = copy.deepcopy(cfg)
            trial.rollout.gpu_memory_utilization = share
            trial.trainer.micro_batch_tokens = 1024
            if share < cfg.rollout.gpu_memory_utilization and plan_memory(
                    trial, shape, device=device, budget=budget, checkpointing=True, **kwargs).fits:
                fixes.append(f"--rollout.gpu_memory_utilization {share} with checkpointing and 1024 tokens")
                break
    if not cfg.model.lora_rank:
        trial = copy.deepcopy(cfg)
        trial.model.lora_rank, trial.trainer.micro_batch_tokens = 16, 1024
        if plan_memory(trial, shape, device=device, budget=budget, checkpointing=True, **kwargs).fits:
            fixes.append("LoRA: --model.lora_rank 16 --model.gradient_checkpointing true "
                         "--trainer.micro_batch_tokens 1024")
    if not fixes:
        static = sum(v for k, v in plan.terms.items() if k.startswith(("weights", "gradients", "optimizer")))
        return (f"no single-device knob fixes it: the weights, gradients and AdamW state alone take "
                f"{static / GB:.1f} GB; shard the learner over more devices (torchrun, FSDP2) or pick a smaller "
                "model")
    return "try " + "; or ".join(fixes)


def shape_of(cfg: Config) -> ModelShape:
    """The model's shape from ``model.path``'s config.json (weights and tokenizer not needed), or the built-in
    model's from the ``builtin.*`` tiny-model knobs."""
    from transformers import AutoConfig, Qwen2Config

    if cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"--plan: {path} has no config.json")
        try:
            return ModelShape.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--plan: cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    from erpo_fast.tokenizer import build_char_tokenizer

    b = cfg.builtin
    return ModelShape.from_config(Qwen2Config(
        vocab_size=len(build_char_tokenizer()), hidden_size=b.hidden_size, num_hidden_layers=b.layers,
        num_attention_heads=b.heads, num_key_value_heads=b.kv_heads, intermediate_size=b.intermediate_size,
        tie_word_embeddings=True))


def main(argv: list[str]) -> int:
    """``python -m erpo_fast.train --plan ...``: print the plan for that command line and exit (0: it fits or no
    budget is known, 1: it does not fit, 2: usage error). No weights are loaded and no device is needed."""
    from erpo_fast.config import config_from_cli
    from erpo_fast.models import resolve_device

    try:
        cfg = config_from_cli([a for a in argv if a != "--plan"])
        device = resolve_device(cfg.trainer.device)
        budget = int(cfg.trainer.memory_budget_gb * GB) if cfg.trainer.memory_budget_gb > 0 else (
            device_budget(cfg, device) if device.type == "cpu" or torch.cuda.is_available() else None)
        shape = shape_of(cfg)
        plan = plan_memory(cfg, shape, device=device, budget=budget,
                           runtime_bytes=current_rss() if device.type == "cpu" else None)
        if plan.fits is False and not plan.checkpointing:
            with_ckpt = plan_memory(cfg, shape, device=device, budget=budget, checkpointing=True,
                                    runtime_bytes=current_rss() if device.type == "cpu" else None)
            if with_ckpt.fits:
                with_ckpt.notes.append("activation checkpointing would be turned on by the plan")
                plan = with_ckpt
        if device.type == "cpu":
            from erpo_fast import cpu_heap

            setting = cfg.trainer.cpu_heap
            plan.notes.append(cpu_heap.describe(setting, cpu_heap.resolve(setting, peak=plan.peak, budget=budget)))
    except ConfigError as e:
        print(f"erpo_fast.train: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {shape.params / 1e6:.1f}M parameters, {shape.layers} layers, hidden {shape.hidden}, "
          f"vocabulary {shape.vocab}")
    print(plan.table())
    if plan.fits is False:
        print(f"does not fit: {_advice(cfg, plan, shape, device, budget)}")
        return 1
    return 0
