"""The learner: packed sequences -> last hidden state -> fused GRPO loss -> AdamW step (FSDP2 optional).

One :meth:`Learner.train_on` call is one training step on this rank's rollout sequences:

1. optional no-grad pre-pass (fused ``linear_logprobs``): old log-probs when ``updates_per_step > 1`` (and
   row-temperature log-probs for the mismatch metrics when the loss runs at T=1). IS weights (truncated and/or
   masked) need no pass: ``linear_grpo_loss`` takes them from the rollout log-probs and the learner side it has;
2. for each of the ``updates_per_step`` mini-batches: the sequences whose advantage is exactly 0 are left out
   (``trainer.skip_zero_advantage``, no KL term: their gradient is exactly 0; the normaliser still counts them);
   micro-batches of the others, at most ``micro_batch_size`` sequences and (``micro_batch_tokens > 0``) at most
   that many packed tokens (:func:`micro_batches`), are packed into ONE row without padding (``position_ids``
   restart at 0 per sequence; under sdpa, attention runs per sequence through :mod:`erpo_fast.packed_attention`,
   so its cost is linear in the number of sequences instead of quadratic in the packed length), run to the last
   hidden state, and scored by ``linear_grpo_loss`` with the LM-head weight; each micro-batch loss is scaled by
   its share of the GLOBAL normaliser (all micro-batches, all ranks), so gradient accumulation gives exactly the
   full-batch gradient; then grad clipping and an AdamW step (fused where torch has it for the device; skipped
   when the loss or the gradient norm is not finite);
3. one LR-scheduler step.

Precision: parameters and AdamW state stay float32 ("master weights"): at RL learning rates (~1e-6) a bf16
parameter would round most updates away. The forward computes in ``model.dtype`` (bf16 on CUDA by default)
through autocast, or through FSDP2's ``MixedPrecisionPolicy`` (bf16 params, fp32 gradient reduction) when
sharded. The fused kernels accumulate in fp32 and return fp32 log-probs.

Distributed (``torch.distributed`` initialised, world size > 1): the model is sharded with FSDP2
``fully_shard`` per decoder layer, then at the root. Each rank passes its OWN slice of the sequences to
``train_on``; before each update the sequences that run are handed out again so that the ranks get about the same
packed tokens (``trainer.balance_ranks``, :mod:`erpo_fast.rank_balance`); token/sequence counts are all-reduced so
every rank uses the global normaliser, and the loss is multiplied by the world size to undo FSDP2's gradient
averaging. Every method that runs the model
(``train_on``, ``compute_logprobs``, ``named_weights``, ``full_model_state_dict``, ``save_optimizer``, ...) is a
collective: all ranks must call it, in the same order. Checkpoints are sharded: :meth:`save_optimizer` writes each
rank's AdamW shards with ``torch.distributed.checkpoint``, and :meth:`full_model_state_dict` gathers the weights
for the Hugging Face export to rank 0 only, with CPU offload.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import algorithms, lora
from .batch import PackedBatch, RolloutSequence, StepBatch, micro_batches, pack_sequences, packed_length
from .choices import LR_SCHEDULES
from .config import AlgorithmConfig, ModelConfig, TrainerConfig
from .distributed import all_reduce_floats
from .lean_layers import apply_lean_layers
from .metrics import Metrics
from .models import decoder, last_hidden_state, lm_head_weight, resolve_device, resolve_dtype
from .packed_attention import PACKED_SDPA, PackedLayout, enable_packed_attention, packed_hidden_state
from .rank_balance import balance_across_ranks

__all__ = ["Learner", "adamw_impl_kwargs", "lr_factor"]


def _placeholder_batch(device: torch.device) -> PackedBatch:
    """A one-token, zero-trained-token batch: under FSDP a rank with fewer micro-batches than its peers runs
    these so that every rank issues the same all-gathers and reduce-scatters."""
    seq = RolloutSequence(prompt_ids=[0], response_ids=[], rollout_logprobs=[], temperature=1.0,
                          advantage=0.0, seq_key=-1)
    return pack_sequences([seq], device=device)


def _split_even(items: Sequence, parts: int) -> list[Sequence]:
    """``parts`` contiguous slices whose sizes differ by at most one (some may be empty)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


# ----------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------------

def lr_factor(step: int, trainer: TrainerConfig) -> float:
    """Multiplier of ``trainer.lr`` at training step ``step`` (0-based; one step = one ``train_on`` call).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (never 0: no step is wasted).
    After it, with ``p`` going linearly from 0 (first step after warm-up) to 1 (step ``max_steps - 1``):
    constant ``1``; linear ``1 - (1 - m) p``; cosine ``m + (1 - m)(1 + cos(pi p)) / 2``, ``m = min_lr_ratio``.
    Steps past ``max_steps - 1`` keep the final value.
    """
    w = trainer.warmup_steps
    if step < w:
        return (step + 1) / w
    if trainer.lr_schedule == "constant":
        return 1.0
    m = trainer.min_lr_ratio
    p = min(1.0, (step - w) / max(1, trainer.max_steps - w - 1))
    if trainer.lr_schedule == "linear":
        return 1.0 - (1.0 - m) * p
    if trainer.lr_schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown lr_schedule {trainer.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")


def adamw_impl_kwargs(impl: str, device: torch.device, distributed: bool) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments for ``trainer.optimizer_impl``.

    ``auto``: the fused kernel (one pass over all tensors, no per-parameter Python loop) where this torch has it for
    the device and the parameters are plain tensors; foreach otherwise (FSDP2's DTensor parameters, other devices).
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused_ok = device.type in _get_fused_kernels_supported_devices()
    if impl == "auto":
        impl = "fused" if fused_ok and not distributed else "foreach"
    if impl == "fused":
        if not fused_ok:
            raise ValueError(f"trainer.optimizer_impl=fused: this torch has no fused AdamW for {device.type}; "
                             "use auto or foreach")
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "loop":
        return {"foreach": False, "fused": False}
    raise ValueError(f"unknown optimizer_impl {impl!r}")


# ----------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------

class _HiddenAndHead(nn.Module):
    """Root module of the learner: decoder to last hidden state, plus the LM-head weight.

    Returning the weight from ``forward`` matters under FSDP2: the root's parameters (embeddings, final norm,
    LM head) are only gathered while the root module runs, and the fused loss needs the full weight.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, position_ids: Tensor, layout: PackedLayout | None = None
                ) -> tuple[Tensor, Tensor]:
        if layout is not None:
            hidden = packed_hidden_state(decoder(self.lm), input_ids, position_ids, layout)
        else:  # flash-attn (varlen from position_ids) or eager: transformers' own packed handling
            hidden = last_hidden_state(self.lm, input_ids, position_ids)
        return hidden, lm_head_weight(self.lm)


def _disable_dropout(model: nn.Module) -> None:
    """On-policy ratios need a deterministic forward: the no-grad and the training pass must agree. (LoRA's own
    dropout is kept: `lora.dropout_active` turns it on in the training forward only.)"""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and ".lora_dropout." not in name:
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _apply_liger(model: nn.Module) -> None:
    """Liger's RMSNorm / RoPE / SwiGLU kernels; its (fused-linear) cross-entropy stays OFF: no logits here."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        warnings.warn(f"model.liger_kernels: Liger has no kernels for model type {model_type!r}; not applied",
                      stacklevel=3)
        return
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=False, model=model)
    accepted = inspect.signature(fn).parameters
    fn(**{k: v for k, v in wanted.items() if k in accepted})


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


# ----------------------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------------------

class Learner:
    """Owns the policy model, AdamW, the LR schedule and (optionally) a frozen reference model.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (e.g. from `erpo_fast.models`); converted to float32 master
            weights on ``device`` (and sharded with FSDP2 when distributed).
        algo, trainer, model_cfg: the config sections (loss knobs; optimiser/schedule/micro-batch knobs;
            compute dtype, gradient checkpointing, Liger).
        device: where the model runs (``"auto"``: cuda when available).
        max_len: the response-length budget (``rollout.max_new_tokens``), Dr. GRPO's constant normaliser.
        ref_model: frozen reference for the KL penalty; required when ``algo.kl_beta > 0`` (but with LoRA, whose
            reference is the policy with its adapters switched off), unused otherwise.

    LoRA (``model_cfg.lora_rank > 0``, `erpo_fast.lora`): the model gets peft's adapters (unless it has them
    already), the optimizer holds only them, and the frozen base is kept in the compute dtype (float32 under
    FSDP2, whose shards need one dtype); the fused loss sees the LM head's effective weight.

    The learner takes ownership of ``model``: it is converted in place (float32, dropout off, FSDP2 wrapping).
    A rollout engine either holds its own copy and receives weights through :meth:`named_weights`, or (same dtype
    and device, not sharded) reads these very parameters, which the optimizer updates in place.
    """

    def __init__(self, model: nn.Module, algo: AlgorithmConfig, trainer: TrainerConfig,
                 model_cfg: ModelConfig, *, device: str | torch.device = "auto", max_len: int,
                 ref_model: nn.Module | None = None):
        self.loss_spec = algorithms.LossSpec.from_config(algo, max_len)  # every loss setting, built (and checked) once
        self.lora = model_cfg.lora_rank > 0
        if algo.kl_beta > 0 and ref_model is None and not self.lora:
            raise ValueError(f"algorithm.kl_beta={algo.kl_beta} needs a reference model (ref_model=...)")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model must be a separate (frozen) copy of the policy, not the same object")
        self.algo, self.trainer, self.model_cfg = algo, trainer, model_cfg
        self.device = resolve_device(device)
        self.compute_dtype = resolve_dtype(model_cfg.dtype, self.device)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.distributed else 1
        # The CPU loss computes in fp32 whatever it is given (kernels/fused_linear/chunked.py: CPU has no bf16 GEMM
        # with an fp32 result), so where the LM head is an fp32 master weight (one process, no LoRA base in the
        # compute dtype) it goes in as it is, with fp32 hidden rows: no [V, H] bf16 copy held through the backward,
        # no upcast of that copy in every row chunk, and the head's log-probs are the fp32 head's.
        self.head_dtype = (torch.float32 if self.device.type == "cpu" and not self.distributed and not self.lora
                           else self.compute_dtype)
        self.step = 0
        # A sequence with advantage exactly 0 adds exactly 0 to the gradient when every loss term is A times
        # something (no KL term): the learner leaves it out of its passes (see _runs).
        self._skip_zero_adv = trainer.skip_zero_advantage and algo.kl_beta == 0

        self.model = self._prepare(model, trainable=True)
        self._policy = self._wrap(self.model)
        # Without a KL term the reference is not needed; with LoRA it is the policy with its adapters off.
        use_ref = ref_model is not None and algo.kl_beta > 0 and not self.lora
        self.ref_model = self._prepare(ref_model, trainable=False) if use_ref else None
        self._ref = None if self.ref_model is None else self._wrap(self.ref_model)
        self._ref_is_base = self.lora and algo.kl_beta > 0
        # Packed attention (sdpa models): attention per sequence, and a group's prompt runs once for its samples.
        self._packed = all(m.config._attn_implementation == PACKED_SDPA
                           for m in (self.model, self.ref_model) if m is not None)

        # Parameters are collected after sharding: fully_shard replaces them with DTensor parameters.
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on norms and biases
        groups = [{"params": decay, "weight_decay": trainer.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        betas = (trainer.adam_beta1, trainer.adam_beta2)
        self.optimizer = torch.optim.AdamW(groups, lr=trainer.lr, betas=betas,
                                           **adamw_impl_kwargs(trainer.optimizer_impl, self.device, self.distributed))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, trainer))

    # ---- setup -------------------------------------------------------------------------------------------

    def _prepare(self, model: nn.Module, *, trainable: bool) -> nn.Module:
        model = model.to(device=self.device, dtype=torch.float32)
        if trainable and self.lora:
            # A no-op when the session injected them already (an engine that samples with them).
            lora.add_adapters(model, self.model_cfg, seed=self.trainer.seed)
            if not self.distributed:  # frozen: no master copy needed, only the compute dtype
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(self.compute_dtype)
        if trainable:  # the export (checkpoint model/) gets the value back: it should load as the original did
            self.exported_use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        _disable_dropout(model)
        # sdpa on a packed row would attend through a dense [T, T] block-diagonal mask: O(T^2) per micro-batch.
        enable_packed_attention(model)
        liger = self.model_cfg.liger_kernels and self.device.type == "cuda"
        if liger:
            _apply_liger(model)
        elif self.model_cfg.liger_kernels and trainable:
            warnings.warn("model.liger_kernels is CUDA-only; ignored on CPU", stacklevel=3)
        if trainable and not liger:  # Liger's norm and SwiGLU kernels keep as little for backward
            apply_lean_layers(model)
            if self.model_cfg.gradient_checkpointing:
                kwargs = {"use_reentrant": False}
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.train()  # dropout is off; train mode keeps gradient checkpointing active
            lora.set_dropout(model, active=False)  # LoRA's own dropout: on in the training forward only
        else:
            model.requires_grad_(False)
            model.eval()
        return model

    def _wrap(self, model: nn.Module) -> nn.Module:
        root = _HiddenAndHead(model)
        if not self.distributed:
            return root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"FSDP2 sharding expects model.model.layers (decoder layers); "
                             f"{type(model).__name__} has none")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp)
        return root

    def _autocast(self, enabled: bool = True):
        """Autocast to the compute dtype (one process; under FSDP2 the mixed-precision policy casts the gathered
        parameters). ``enabled=False`` is the outer context around an update's micro-batches: autocast caches its
        casts of the weights until the outermost autocast context exits, so each weight is cast once per update
        instead of once per micro-batch; only ``_hidden`` turns it on, and the numbers are unchanged."""
        if self.compute_dtype == torch.float32 or self.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    # ---- distributed helpers ----------------------------------------------------------------------------

    def _reshard(self, module: nn.Module | None) -> None:
        # A root FSDP2 module keeps its gathered parameters after a forward with no backward; free them.
        if self.distributed and module is not None and hasattr(module, "reshard"):
            module.reshard()

    # ---- forward passes -----------------------------------------------------------------------------------

    def _hidden(self, root: nn.Module, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """(hidden at the trained positions [N, H], LM-head weight [V, H]) in the loss's dtype (``head_dtype``)."""
        with self._autocast():
            hidden, weight = root(batch.input_ids, batch.position_ids, batch.layout() if self._packed else None)
        return hidden[0, batch.label_index].to(self.head_dtype), weight.to(self.head_dtype)

    @torch.no_grad()
    def _batch_logprobs(self, root: nn.Module, batch: PackedBatch) -> Tensor:
        from erpo_fast.kernels.fused_linear import linear_logprobs

        hidden, weight = self._hidden(root, batch)
        return linear_logprobs(hidden, weight, batch.target_ids, batch.temperature).float()

    def _ref_logprobs(self, batch: PackedBatch) -> Tensor | None:
        if self._ref_is_base:
            with lora.adapters_off(self.model):
                return self._batch_logprobs(self._policy, batch)
        return self._batch_logprobs(self._ref, batch) if self._ref is not None else None

    def _micro_batches(self, sequences: Sequence[RolloutSequence]) -> list[list[int]]:
        return micro_batches(sequences, max_sequences=self.trainer.micro_batch_size,
                             max_tokens=self.trainer.micro_batch_tokens, share_prompts=self._packed)

    def _runs(self, seq: RolloutSequence) -> bool:
        """Whether the learner runs ``seq`` through its passes: not when its advantage is exactly 0 and
        ``_skip_zero_adv`` holds; its gradient is then exactly 0, and it still counts in the loss's normaliser."""
        return not (self._skip_zero_adv and seq.advantage == 0.0)

    def _loss_temperature(self) -> str | float:
        return "row" if self.algo.logprob_temperature == "row" else 1.0

    @torch.no_grad()
    def compute_logprobs(self, sequences: Sequence[RolloutSequence], *, temperature: str | float = "row"
                         ) -> list[Tensor]:
        """Per-sequence fp32 log-probs of the response tokens under the current policy (no grad, fused).

        ``temperature="row"``: each sequence at its own sampling temperature; a float: that temperature.
        Micro-batched like training. Collective under FSDP (all ranks call it, with their own sequences).
        """
        sequences = list(sequences)
        batches = [pack_sequences([sequences[i] for i in idx], temperature=temperature, vocab_size=self.vocab_size,
                                  share_prompts=self._packed, device=self.device)
                   for idx in self._micro_batches(sequences)]
        (num,) = all_reduce_floats([len(batches)], op="max")
        out: list[Tensor] = []
        for i in range(int(num)):
            batch = batches[i] if i < len(batches) else _placeholder_batch(self.device)
            lp = self._batch_logprobs(self._policy, batch)
            if i < len(batches):
                out.extend(lp.split(batch.response_lengths))
        self._reshard(self._policy)
        return [t.clone() for t in out]

    # ---- training -----------------------------------------------------------------------------------------

    def train_on(self, sequences: StepBatch | Sequence[RolloutSequence]) -> dict[str, float | int | bool]:
        """One training step on this rank's ``sequences``; returns global metrics (identical on every rank).

        Given a :class:`StepBatch` whose ``global_sequences`` is 0 (no rank has anything to learn from), every
        rank skips the step and gets ``{}``; otherwise every rank must call this, also one with no sequences.

        With ``updates_per_step = K > 1`` the local sequences are split into K contiguous mini-batches (global
        mini-batch k = the union of every rank's k-th slice), old log-probs are computed once before the first
        update, and each mini-batch gets its own optimizer step.

        Metrics (reduced by `erpo_fast.metrics.Metrics`). Means over the updates: ``loss`` (the aggregated policy
        loss), ``grad_norm`` (pre-clip) and the loss's token means ``clip_frac`` (= ``clip_frac_low`` +
        ``clip_frac_high``), ``ratio_mean``, ``dual_clip_frac`` (when dual clip is on), ``kl`` (0 without a
        reference) and ``entropy``; ``ratio_max``, the largest ratio of any update (see `algorithms.policy_loss`).
        Totals: ``num_tokens`` and ``num_sequences`` (trained, global: the normaliser's counts) and
        ``zero_adv_skipped`` (of those sequences, the ones left out of the passes: advantage exactly 0, see
        ``_runs``; the token means above and below but ``loss`` then cover the sequences that ran, and are absent
        when none ran). Token means over the whole batch:
        ``is_weight_mean`` (when IS is on), ``is_mask_frac`` (tokens rejected by masked IS) and the rollout/learner
        mismatch (``mismatch_logp_abs_mean``/``_max``, ``mismatch_kl_k3``, ``mismatch_ratio_outside_frac``; see
        `algorithms.mismatch_metrics`), both sides at each row's own temperature and before any update. Then
        ``lr`` and ``skipped_nonfinite`` (an update was skipped because its loss or gradient norm was not finite).
        """
        if isinstance(sequences, StepBatch):
            if sequences.global_sequences == 0:
                return {}
            sequences = sequences.sequences
        sequences = self._check_batch(sequences)
        if not sequences and not self.distributed:
            raise ValueError("the learner needs at least one sequence")
        lr = self.optimizer.param_groups[0]["lr"]
        # No-grad pre-pass: old log-probs for off-policy updates (and row-temperature ones for the metrics), of the
        # sequences the updates will run; a left-out one's old log-probs are never read (NaN).
        ran = [i for i, s in enumerate(sequences) if self._runs(s)]
        pre = self._pre_pass([sequences[i] for i in ran], need_old=self.trainer.updates_per_step > 1)
        old = None
        if pre["old"] is not None:
            old = [torch.full((len(s.response_ids),), math.nan) for s in sequences]
            for i, lp in zip(ran, pre["old"]):
                old[i] = lp
        step = Metrics()
        skipped = False
        # The mini-batches split every sequence, left out or not: each update's normaliser counts them all.
        for mini in _split_even(list(range(len(sequences))), self.trainer.updates_per_step):
            update = self._loss_and_grads([sequences[i] for i in mini], None if old is None else [old[i] for i in mini])
            grad_norm = self._clip_grad_norm()
            if math.isfinite(update.result().get("loss", 0.0)) and math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                skipped = True
            self.optimizer.zero_grad(set_to_none=True)
            update.mean("grad_norm", grad_norm)
            step.update(update)
        with warnings.catch_warnings():
            # A skipped (non-finite) first update is deliberate; torch would warn that no optimizer step ran.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.step += 1
        if pre["row"] is not None:  # the loss ran at T=1: measure the mismatch at the rows' temperatures
            step.update(self._row_mismatch([sequences[i] for i in ran], pre["row"]))
        return {**step.result(), "lr": lr, "skipped_nonfinite": skipped}

    def _row_mismatch(self, sequences: Sequence[RolloutSequence], row_logprobs: list[Tensor]) -> Metrics:
        """Global `algorithms.mismatch_metrics` of ``sequences`` from their row-temperature log-probs (the loss's own
        are at T=1 then, not comparable with the engine's). Collective."""
        rollout = [torch.tensor(s.rollout_logprobs or [math.nan] * len(s.response_ids), dtype=torch.float32)
                   for s in sequences]
        lp = torch.cat([t.cpu() for t in row_logprobs]) if row_logprobs else torch.zeros(0)
        roll = torch.cat(rollout) if rollout else torch.zeros(0)
        metrics = Metrics()
        _add_mismatch(metrics, algorithms.mismatch_metrics(lp, roll, torch.ones_like(lp, dtype=torch.bool),
                                                           ratio_bound=self.algo.mismatch_ratio_bound))
        return metrics.all_reduce()

    def loss_and_grads(self, sequences: Sequence[RolloutSequence], *,
                       old_logprobs: Sequence[Tensor] | None = None) -> dict[str, float]:
        """The loss of ``sequences`` (this rank's part of ONE global mini-batch) and its gradient in the
        parameters' ``.grad`` (zeroed first); no clipping, no optimizer step. :meth:`train_on` runs it once per
        mini-batch; alone, it shows what train_on optimises. Collective.

        ``old_logprobs`` (per sequence, per response token): the off-policy ratio's denominator; ``None`` =
        on-policy. Returns the mini-batch's global metrics: those of :meth:`train_on` but ``grad_norm``, ``lr`` and
        ``skipped_nonfinite``, and without the mismatch when the loss runs at T=1 (train_on measures it apart).
        """
        return self._loss_and_grads(sequences, old_logprobs).result()

    def _loss_and_grads(self, sequences: Sequence[RolloutSequence], old_logprobs: Sequence[Tensor] | None
                        ) -> Metrics:
        sequences = self._check_batch(sequences)
        if old_logprobs is not None:
            old_logprobs = [torch.as_tensor(o, dtype=torch.float32, device=self.device) for o in old_logprobs]
            if len(old_logprobs) != len(sequences) or any(
                    o.shape != (len(s.response_ids),) for o, s in zip(old_logprobs, sequences)):
                raise ValueError("old_logprobs must hold one [len(response_ids)] tensor per sequence")
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward(sequences, old_logprobs)

    def _check_batch(self, sequences: Sequence[RolloutSequence]) -> list[RolloutSequence]:
        sequences = list(sequences)
        keys = [s.seq_key for s in sequences]
        if len(set(keys)) != len(keys):
            raise ValueError("seq_key must be unique per sequence in the batch")
        for knob, value in (("is_level", self.loss_spec.is_level), ("is_mask", self.loss_spec.is_mask)):
            if value is not None and any(len(s.rollout_logprobs) != len(s.response_ids) for s in sequences):
                raise ValueError(f"algorithm.{knob}={value} needs rollout_logprobs for every response token")
        return sequences

    def _pre_pass(self, sequences: list[RolloutSequence], *, need_old: bool) -> dict:
        """No-grad log-prob passes: ``old`` (per sequence, at the loss temperature) when ``need_old``; ``row`` (at
        each row's temperature, for the mismatch metrics) only when the loss runs at T=1.

        IS weights need no pass of their own: ``linear_grpo_loss`` takes them from ``old`` or from the log-probs
        it computes anyway, and reports the mismatch of the same two.
        """
        out: dict = {"old": None, "row": None}
        if need_old:
            out["old"] = self.compute_logprobs(sequences, temperature=self._loss_temperature())
        if self._loss_temperature() != "row":
            out["row"] = self.compute_logprobs(sequences, temperature="row")
        return out

    def _forward_backward(self, sequences: list[RolloutSequence], old_by_seq: list[Tensor] | None) -> Metrics:
        """Accumulate the gradient of one global mini-batch (this rank's part: ``sequences``).

        Each micro-batch's loss is scaled by its share of the GLOBAL normaliser (tokens for token_mean,
        sequences for the seq_* modes), times the world size to undo FSDP2's gradient averaging, so that the
        sum over micro-batches and ranks is exactly the full-batch gradient. Returns the global metrics (one
        all-reduce).
        """
        from erpo_fast.kernels.fused_linear import linear_grpo_loss

        temperature = self._loss_temperature()
        # The sequences that run (see _runs), with their old log-probs; the normaliser counts the left-out ones too.
        runs = [self._runs(s) for s in sequences]
        work = [(s, None if old_by_seq is None else old_by_seq[i]) for i, s in enumerate(sequences) if runs[i]]
        if self.distributed and self.trainer.balance_ranks:  # where a sequence runs does not change the gradient
            work = balance_across_ranks(work, rank=dist.get_rank(), share_prompts=self._packed)
        micro = self._micro_batches([s for s, _ in work])
        packed = sum(packed_length([work[i][0] for i in idx], share_prompts=self._packed) for idx in micro)
        left_out = [s for s, r in zip(sequences, runs) if not r]
        left_tokens, left_seqs = sum(len(s.response_ids) for s in left_out), sum(1 for s in left_out if s.response_ids)
        local_tokens = sum(len(s.response_ids) for s in sequences)
        tokens, seqs, ran_tokens, num_left, packed_sum = all_reduce_floats([
            local_tokens, sum(1 for s in sequences if s.response_ids), local_tokens - left_tokens, left_seqs, packed])

        def share(n_tokens: int, n_seqs: int) -> float:
            """A part's share of the global normaliser: tokens for token_mean, sequences for the seq_* modes."""
            return n_tokens / tokens if self.loss_spec.loss_agg == "token_mean" else n_seqs / max(seqs, 1.0)

        # At least one pass: with every sequence left out, the placeholder's zero gradient gives AdamW the step
        # (momentum, weight decay) it would take on the computed zero gradient of those sequences.
        num_micro, packed_max = all_reduce_floats([max(1, len(micro)), packed], op="max")
        metrics = Metrics()
        with self._autocast(enabled=False):  # keeps each weight's cast for the update (see _autocast)
            for k in range(int(num_micro)):
                part_work = [work[i] for i in micro[k]] if k < len(micro) else []
                batch = (pack_sequences([s for s, _ in part_work], temperature=temperature,
                                        vocab_size=self.vocab_size, device=self.device, share_prompts=self._packed)
                         if part_work else _placeholder_batch(self.device))
                # (a group handed over by another rank brings its old log-probs on the CPU: see rank_balance)
                old = (torch.cat([o.to(self.device) for _, o in part_work])
                       if part_work and old_by_seq is not None else None)

                ref = self._ref_logprobs(batch)
                with lora.dropout_active(self.model):
                    hidden, weight = self._hidden(self._policy, batch)
                n = batch.num_tokens
                if n == 0:
                    # Nothing to train, but the backward runs: FSDP needs its reduce-scatters on every rank, and
                    # AdamW a (zero) gradient when every sequence was left out.
                    (hidden.sum() * 0.0 + weight.sum() * 0.0).backward()
                    continue
                loss, m = linear_grpo_loss(
                    hidden, weight, batch.target_ids, batch.temperature, batch.advantages,
                    torch.ones(n, dtype=torch.bool, device=self.device), self.loss_spec,
                    old_logprobs=old, ref_logprobs=ref, seq_ids=batch.seq_ids,
                    rollout_logprobs=batch.rollout_logprobs)
                # The kernel normalises by this micro-batch's own count; rescale to the global normaliser.
                part = share(n, batch.num_sequences)
                (loss * (part * self.world_size)).backward()
                metrics.mean("loss", float(loss.detach()), weight=part)
                _add_loss_metrics(metrics, m, update_share=n / ran_tokens, tokens=n,
                                  with_mismatch=temperature == "row")
        if left_tokens:  # their loss is exactly 0; the other loss metrics cover the sequences that ran
            metrics.mean("loss", 0.0, weight=share(left_tokens, left_seqs))
        metrics = metrics.all_reduce()
        metrics.total("num_tokens", int(tokens))
        metrics.total("num_sequences", int(seqs))
        metrics.total("zero_adv_skipped", int(num_left))  # counted as num_sequences counts: with a response
        if self.distributed and packed_sum:  # the busiest rank sets the update's time (see rank_balance)
            metrics.mean("rank_imbalance", packed_max * self.world_size / packed_sum)
        return metrics

    def _clip_grad_norm(self) -> float:
        """Global pre-clip gradient norm (all ranks, all shards); clips in place when ``grad_clip > 0``."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.trainer.grad_clip if self.trainer.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        return float(_full(norm))

    # ---- weights and state ------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, full tensor)`` for every parameter (Hugging Face names; tied weights once), gathered from
        the FSDP2 shards when sharded. With LoRA: the merged weights of the adapted layers only (the others never
        change), under the plain model's names. Collective under FSDP: every rank must exhaust the iterator."""
        self._reshard(self._policy)
        if self.lora:
            yield from lora.merged_weights(self.model, _full)
            return
        for name, p in self.model.named_parameters():
            yield name, _full(p.detach())

    def adapter_weights(self) -> Iterator[tuple[str, Tensor]]:
        """LoRA: ``(the model's own name, full tensor)`` of every adapter tensor. Collective under FSDP."""
        self._reshard(self._policy)
        yield from lora.adapter_weights(self.model, _full)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """LoRA: the adapters as CPU tensors on rank 0 (``{}`` on the others), for the checkpoint. Collective."""
        tensors = {name: t.to("cpu", copy=True) for name, t in self.adapter_weights()}
        return tensors if not self.distributed or dist.get_rank() == 0 else {}

    def full_model_state_dict(self) -> dict[str, Tensor]:
        """The model's full state dict (Hugging Face names; with LoRA, the merged model) as CPU tensors on rank 0,
        for the HF export; ``{}`` on the other ranks. Under FSDP2 it is gathered tensor by tensor and offloaded to
        CPU as it arrives (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), so no device holds it
        whole. Collective."""
        self._reshard(self._policy)
        if not self.distributed:
            full = {name: t.detach().to("cpu", copy=True) for name, t in self.model.state_dict().items()}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self._policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            full = {name.removeprefix("lm."): t for name, t in full.items()}
        if self.lora and full:  # the plain model: adapters merged in, peft's names gone
            full = lora.merged_state_dict(self.model, full)
        return full

    def state_dict(self) -> dict:
        """Scheduler and step counter (plain, small). Model weights go to the HF export, the optimizer state to
        :meth:`save_optimizer`'s shards."""
        return {"scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"scheduler", "step"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {', '.join(sorted(missing))}")
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def save_optimizer(self, directory: str | Path) -> None:
        """Write the AdamW state with ``torch.distributed.checkpoint``: each rank writes only its own shards
        (``__<rank>_0.distcp``; rank 0 also the ``.metadata``), so no rank ever holds the full state. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._reshard(self._policy)
        try:
            with _single_process_dcp():
                dcp.save({"optimizer": get_optimizer_state_dict(self._policy, self.optimizer)},
                         checkpoint_id=directory, no_dist=not dist.is_initialized())
        except CheckpointException as e:  # Ctrl-C while writing: an interruption, not a checkpoint failure
            if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
                raise KeyboardInterrupt from None
            raise

    def load_optimizer(self, directory: str | Path) -> None:
        """Load :meth:`save_optimizer`'s shards into this learner's (sharded) optimizer; the world size may
        differ from the one that saved them. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        self._reshard(self._policy)
        state = {"optimizer": get_optimizer_state_dict(self._policy, self.optimizer)}  # initialised, to load into
        with _single_process_dcp():
            dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
        set_optimizer_state_dict(self._policy, self.optimizer, state["optimizer"])


@contextlib.contextmanager
def _single_process_dcp():
    """torch.distributed.checkpoint warns on every save and load without a process group ("torch.distributed is
    disabled ... assuming the intent is to save in a single process"); one process is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# linear_grpo_loss metrics as they are logged
_LOGGED_AS = {"kl_mean": "kl", "entropy_mean": "entropy"}


def _add_loss_metrics(metrics: Metrics, m: dict[str, float], *, update_share: float, tokens: int,
                      with_mismatch: bool) -> None:
    """One micro-batch's `linear_grpo_loss` metrics (token means over its ``tokens``) into ``metrics``.

    The loss's own metrics (`algorithms.policy_loss`'s, the entropy) describe an update: weighted by the
    micro-batch's token share of its update, every update counts once in train_on's mean over updates. The
    rollout-correction ones describe the batch: weighted by their tokens, they are token means over the step.
    ``with_mismatch=False`` (the loss ran at T=1): its mismatch is not comparable with the engine's; left out.
    """
    m = {_LOGGED_AS.get(k, k): v for k, v in m.items()}
    mismatch = {k: m.pop(k) for k in list(m) if k.startswith("mismatch_")}
    correction = {k: m.pop(k) for k in ("is_weight_mean", "is_mask_frac") if k in m}
    metrics.add(m, weight=update_share)
    metrics.add(correction, weight=tokens)
    if with_mismatch:
        _add_mismatch(metrics, mismatch)


def _add_mismatch(metrics: Metrics, m: dict[str, float]) -> None:
    """`algorithms.mismatch_metrics` values, weighted by the tokens they measured (none measured: none added)."""
    m = dict(m)
    measured = m.pop("mismatch_tokens", 0)
    if measured:
        metrics.add(m, weight=measured)
