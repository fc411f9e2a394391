"""NativeEngine: the embedded rollout engine, plain torch plus our per-row-temperature sampler.

It drives any Hugging Face causal LM with its own batched decode loop:

- **Ragged prompts without padding leaks.** Prompts are right-padded for a batched prefill. With a
  causal mask a real token only ever attends to earlier (real) tokens, and position ids are the plain
  0..L-1, so padding cannot reach any result by construction. Prompts of very different lengths go
  into separate prefill batches (length buckets), so padding costs little compute either. During
  decode row r writes its k/v at slot ``len_r + t`` of a static cache and attends to slots
  ``<= len_r + t`` only; the stale slots behind that are masked out (and hold finite values, so
  0 * value stays 0).
- **Shared prefill.** Each distinct prompt is prefilled once; its k/v is broadcast into the n cache
  rows of its samples. Only the last real position of each prompt reaches the LM head.
- **Finished rows stop costing compute.** When enough rows have stopped, the batch is compacted:
  the cache and the per-row state keep only the live rows (``compact_below``).
- **A prompt's k/v once on CPU.** With n > 1 the fused backend stores each prompt's k/v once for its samples and
  scores all of them against it in one matmul per step (``prompt_kv``); elsewhere each row holds a copy.
- **Packed weights on CPU.** The fused backend's matmuls run through oneDNN on copies of the weights reordered
  into its blocked layout at the start of each call and dropped at its end (``onednn_weights``).
- **Sampling** goes through ``erpo_fast.kernels.sampling.sample_tokens`` with a per-row temperature tensor
  (temperature, then top-k, then top-p); it returns the processed log-prob of each sampled token.

Two backends run the model:

- ``"fused"`` (Llama, Qwen2, Qwen3, Mistral): a gpt-fast-style loop over the model's own weights, with
  the q/k/v and gate/up projections fused into single matmuls. The fusion re-binds the HF parameters
  as views of one buffer, so no weight is stored twice and ``update_weights`` writes straight through.
- ``"hf"`` (any other decoder using the transformers ``Cache`` API with sdpa or eager attention): the
  model's own modules, fed our 4-D masks, position ids and a ragged static cache.

A model with peft LoRA layers (`erpo_fast.lora`) samples with its adapters: the fused backend adds each adapter's
``scaling * B A x`` beside the (fused) base matmul, reading the adapter tensors where they are (the learner's own
when the engine shares its parameters: the weight sync is then a no-op); the hf backend runs peft's own forward.
Sampling never applies LoRA's dropout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from erpo_fast.kernels.sampling import derive_seeds, sample_tokens
from erpo_fast.packed_attention import length_buckets

from .base import Sample, resolve_seeds, resolve_stop_token_ids, strip_wrappers, validate_generate_args
from .onednn_weights import linear as _dense
from .onednn_weights import onednn_available, pack
from .prompt_kv import SharedPromptKVCache

FUSED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# Transformers prefixes that name the same parameter: torch.compile wrappers and DDP/FSDP1 containers.


class RaggedKVCache:
    """Static per-layer k/v buffers ``[rows, kv_heads, max_len, head_dim]`` where each row has its own length.

    Prefill writes positions ``0..L-1`` of every prompt (broadcast to its n sample rows); each decode step
    writes one slot per row at that row's position. Buffers start at zero so masked slots are finite.
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._row_index = torch.arange(rows, device=device)
        # Set by the engine before each prefill batch / decode step (read inside attention).
        self.prefill_prompts: torch.Tensor | None = None  # which prompts the current prefill batch holds
        self.num_prompts = rows
        self.positions: torch.Tensor | None = None  # per row: the next token's sequence position (= its KV slot)
        self.kv_len = 0

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[batch, kv_heads, L, head_dim]`` for the prompts ``self.prefill_prompts``; each prompt
        fills the ``rows // num_prompts`` sample rows that follow from it."""
        _, heads, length, dim = k.shape
        repeats = self.rows // self.num_prompts
        for buf, new in ((self.keys[layer], k), (self.values[layer], v)):
            # A [prompts, repeats, ...] view takes the broadcast copy without a repeat_interleave temporary.
            per_prompt = buf.view(self.num_prompts, repeats, heads, self.max_len, dim)
            per_prompt[self.prefill_prompts, :, :, :length] = new[:, None]

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: ``[rows, kv_heads, head_dim]`` at ``self.positions``; returns the live ``[:, :, :kv_len]`` views."""
        self.keys[layer][self._row_index, :, self.positions] = k
        self.values[layer][self._row_index, :, self.positions] = v
        return self.keys[layer][:, :, : self.kv_len], self.values[layer][:, :, : self.kv_len]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep only ``rows`` (a 1-D index), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self._row_index = torch.arange(len(rows), device=rows.device)


# --------------------------------------------------------------------------------------------------
# Backend 1: fused decode loop for the Llama family
# --------------------------------------------------------------------------------------------------


def _fuse_linears(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """Concatenate the linears' weights (and biases) along the output dim and re-bind each parameter as a
    view of the fused buffer, so that one matmul computes all of them and the weights exist once."""
    # Never an inference tensor (a re-fuse may run inside generate's inference_mode): when the engine shares the
    # learner's parameters, they become views of this buffer and autograd must be able to save them.
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears], dim=0)
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(m.out_features)
                              for b, m in zip(biases, linears)])
        aliases = []
        offset = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = weight[offset: offset + rows]
            aliases.append((m.weight, m.weight.data_ptr()))
            if m.bias is not None:
                m.bias.data = bias[offset: offset + rows]
                aliases.append((m.bias, m.bias.data_ptr()))
            offset += rows
    return weight, bias, aliases


def _norm_eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _lora_delta(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``scaling * B(A(x))`` of a peft LoRA layer, in x's dtype (no dropout: sampling never drops)."""
    (name,) = module.active_adapters
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * module.scaling[name]


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The plain linear under a LoRA layer (the module itself otherwise)."""
    return module.base_layer if _is_lora(module) else module


def _linear(module: torch.nn.Module, x: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's output, LoRA included (the base matmul of a LoRA layer plus its adapter); ``packed``: the
    base weight's oneDNN copy (onednn_weights), when the engine packed one for this call."""
    base = _base(module)
    out = _dense(x, base.weight, base.bias, packed)
    return out if not _is_lora(module) or module.disable_adapters else out + _lora_delta(module, x)


def _add_lora(out: torch.Tensor, x: torch.Tensor, adapted: list) -> torch.Tensor:
    """A fused matmul's output plus the adapters of the LoRA layers among its parts (``(start, end, layer)``)."""
    for start, end, module in adapted:
        if not module.disable_adapters:
            out[..., start:end] += _lora_delta(module, x)
    return out


def _adapted_slices(linears: Sequence[torch.nn.Module]) -> list:
    out, start = [], 0
    for m in linears:
        if _is_lora(m):
            out.append((start, start + m.out_features, m))
        start += m.out_features
    return out


class _FusedLayer:
    def __init__(self, layer: torch.nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.ln1_eps, self.ln2_eps = _norm_eps(self.ln1), _norm_eps(self.ln2)
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3: RMSNorm over head_dim before RoPE
        self.k_norm = getattr(attn, "k_norm", None)
        self.o_proj, self.down_proj, self.act = attn.o_proj, mlp.down_proj, mlp.act_fn
        self._qkv_linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        self._gate_up_linears = (mlp.gate_proj, mlp.up_proj)
        self.intermediate = mlp.gate_proj.out_features
        self.qkv_lora = _adapted_slices(self._qkv_linears)
        self.gate_up_lora = _adapted_slices(self._gate_up_linears)
        self.packed: dict[str, torch.Tensor] = {}  # oneDNN copies of the weights, during a generate call only
        self.fuse()

    def fuse(self) -> None:
        self.w_qkv, self.b_qkv, aliases_qkv = _fuse_linears(self._qkv_linears)
        self.w_gate_up, self.b_gate_up, aliases_gu = _fuse_linears(self._gate_up_linears)
        self._aliases = aliases_qkv + aliases_gu

    def is_fused(self) -> bool:
        """False once something (``model.to``, ``param.data = ...``) broke the parameter/buffer aliasing."""
        return all(p.data_ptr() == ptr for p, ptr in self._aliases) and self.w_qkv.device == self.o_proj.weight.device

    def pack(self) -> None:
        self.packed = {"qkv": pack(self.w_qkv), "gate_up": pack(self.w_gate_up),
                       "o": pack(_base(self.o_proj).weight), "down": pack(_base(self.down_proj).weight)}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # Lower precision: round exactly where transformers does (normalise in fp32, cast, then scale).
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the sign of rotate_half folded into ``sin_signed``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed


class FusedLlamaRunner:
    """Prefill and one-token decode over a Llama-family model's weights (see module docstring)."""

    def __init__(self, model: torch.nn.Module, pack_weights: bool = True) -> None:
        config = model.config
        base = model.model
        self.model = model
        self.embed, self.final_norm, self.lm_head = base.embed_tokens, base.norm, model.lm_head
        self.rotary = base.rotary_emb
        attn = base.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_layers = config.num_hidden_layers
        self.layers = [_FusedLayer(layer) for layer in base.layers[: self.num_layers]]
        self._rope_len = 0
        self.pack_weights = pack_weights
        self.lm_head_packed: torch.Tensor | None = None

    def ensure_ready(self, max_len: int) -> None:
        if not all(layer.is_fused() for layer in self.layers):
            for layer in self.layers:
                layer.fuse()
        if self._rope_len < max_len:
            self._build_rope(max(max_len, 2 * self._rope_len))

    def _build_rope(self, length: int) -> None:
        weight = self.embed.weight
        positions = torch.arange(length, device=weight.device)[None]
        # The model's own rotary module, so every RoPE variant (llama3, yarn, ...) is honoured.
        cos, sin = self.rotary(weight[:1], positions)
        half = self.head_dim // 2
        self.cos = cos[0]
        self.sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self._rope_len = length

    def release(self) -> None:
        self.cos = self.sin_signed = None
        self._rope_len = 0
        self.unpack()

    def pack(self) -> None:
        """oneDNN copies of every linear's weight for one generate call (CPU; see onednn_weights)."""
        weight = _base(self.lm_head).weight
        if not (self.pack_weights and weight.device.type == "cpu" and onednn_available(weight.dtype)):
            return
        for layer in self.layers:
            if not layer.is_fused():
                layer.fuse()
            layer.pack()
        self.lm_head_packed = pack(weight)

    def unpack(self) -> None:
        for layer in self.layers:
            layer.packed = {}
        self.lm_head_packed = None

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor,
                cache: RaggedKVCache | SharedPromptKVCache) -> torch.Tensor:
        """ids ``[P, L]`` right-padded; returns the logits at each prompt's last real token, ``[P, V]``."""
        prompts, length = ids.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed(ids)
        cos, sin = self.cos[:length, None], self.sin_signed[:length, None]  # broadcast over heads
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1.weight, layer.ln1_eps)
            qkv = _add_lora(_dense(h, layer.w_qkv, layer.b_qkv, layer.packed.get("qkv")), h, layer.qkv_lora)
            q = qkv[..., : hq * d].unflatten(-1, (hq, d))
            k = qkv[..., hq * d: (hq + hkv) * d].unflatten(-1, (hkv, d))
            v = qkv[..., (hq + hkv) * d:].unflatten(-1, (hkv, d)).transpose(1, 2)
            if layer.q_norm is not None:
                q = layer.q_norm(q)
                k = layer.k_norm(k)
            q = _rope(q, cos, sin).transpose(1, 2)
            k = _rope(k, cos, sin).transpose(1, 2)
            cache.write_prefill(i, k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=hq != hkv)
            x = x + _linear(layer.o_proj, o.transpose(1, 2).flatten(2), layer.packed.get("o"))
            x = x + self._mlp(layer, x)
        last = x[torch.arange(prompts, device=x.device), lengths - 1]
        return self._lm_head(last)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.lm_head, _rms_norm(x, self.final_norm.weight, _norm_eps(self.final_norm)),
                       self.lm_head_packed)

    def decode(self, tokens: torch.Tensor, cache: RaggedKVCache | SharedPromptKVCache) -> torch.Tensor:
        """One token per row at ``cache.positions``; returns ``[rows, V]`` logits."""
        rows = tokens.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        positions = cache.positions
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]
        if isinstance(cache, RaggedKVCache):
            attend = self._ragged_attention(cache, rows, hq // hkv)
        else:  # SharedPromptKVCache
            attend = cache.decode_attention(self.scaling, hq // hkv)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1.weight, layer.ln1_eps)
            qkv = _add_lora(_dense(h, layer.w_qkv, layer.b_qkv, layer.packed.get("qkv")), h, layer.qkv_lora)
            v = qkv[:, (hq + hkv) * d:].view(rows, hkv, d)
            if layer.q_norm is None:  # q and k share one RoPE call
                qk = _rope(qkv[:, : (hq + hkv) * d].view(rows, hq + hkv, d), cos, sin)
                q, k = qk[:, :hq], qk[:, hq:]
            else:
                q = _rope(layer.q_norm(qkv[:, : hq * d].view(rows, hq, d)), cos, sin)
                k = _rope(layer.k_norm(qkv[:, hq * d: (hq + hkv) * d].view(rows, hkv, d)), cos, sin)
            # GQA without repeating k/v: the G query heads of one kv head act as G queries.
            o = attend(i, q.reshape(rows, hkv, hq // hkv, d), k, v)
            x = x + _linear(layer.o_proj, o.reshape(rows, hq * d), layer.packed.get("o"))
            x = x + self._mlp(layer, x)
        return self._lm_head(x)

    def _ragged_attention(self, cache: RaggedKVCache, rows: int, groups: int):
        """``attend(layer, q, k, v)``: writes the step's k, v into the row's own cache, then attention of one query
        token per row over its live cache slots.

        CUDA: SDPA with a boolean mask. CPU: two batched matmuls with the scale and an additive mask folded
        into one baddbmm; SDPA's CPU kernel costs more per (row, head) than the math at these sizes.
        """
        live = torch.arange(cache.kv_len, device=cache.positions.device)
        allowed = live[None] <= cache.positions[:, None]  # [rows, kv_len]
        if allowed.device.type != "cpu":
            mask = allowed[:, None, None]

            def attend_sdpa(layer, q, k, v):
                keys, values = cache.write_decode(layer, k, v)
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)

            return attend_sdpa
        hkv, kv_len = self.num_kv_heads, allowed.shape[1]
        bias = torch.zeros(allowed.shape, dtype=self.cos.dtype, device=allowed.device)
        bias.masked_fill_(~allowed, float("-inf"))
        # [rows * kv_heads, G, kv_len], built once per step and shared by every layer.
        bias = bias[:, None, None].expand(rows, hkv, groups, kv_len).reshape(rows * hkv, groups, kv_len)

        def attend(layer, q, k, v):
            keys, values = cache.write_decode(layer, k, v)
            d = q.shape[-1]
            # [rows, kv_heads, L, d] slices of the cache merge into [rows * kv_heads, L, d] views (no copy).
            scores = torch.baddbmm(bias, q.reshape(rows * hkv, groups, d), keys.reshape(rows * hkv, kv_len, d).mT,
                                   alpha=self.scaling)
            return torch.bmm(torch.softmax(scores, dim=-1), values.reshape(rows * hkv, kv_len, d))

        return attend

    @staticmethod
    def _mlp(layer: _FusedLayer, x: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(x, layer.ln2.weight, layer.ln2_eps)
        gate_up = _add_lora(_dense(h, layer.w_gate_up, layer.b_gate_up, layer.packed.get("gate_up")), h,
                            layer.gate_up_lora)
        gate, up = gate_up.split(layer.intermediate, dim=-1)
        return _linear(layer.down_proj, layer.act(gate) * up, layer.packed.get("down"))


# --------------------------------------------------------------------------------------------------
# Backend 2: the model's own HF modules, fed our masks, positions and ragged cache
# --------------------------------------------------------------------------------------------------


class _RaggedCacheLayer(CacheLayerMixin):
    """One layer of the transformers-facing adapter over a RaggedKVCache."""

    is_sliding = False

    def __init__(self, owner: _HFCacheAdapter, layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        cache = self.owner.ragged
        if self.owner.prefilling:
            cache.write_prefill(self.layer_idx, key_states, value_states)
            return key_states, value_states  # prefill attends within the prompt only
        return cache.write_decode(self.layer_idx, key_states[:, :, 0], value_states[:, :, 0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.ragged.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.ragged.kv_len

    def get_max_length(self) -> int:
        return self.owner.ragged.max_len


class _HFCacheAdapter(Cache):
    def __init__(self, ragged: RaggedKVCache) -> None:
        self.ragged, self.prefilling = ragged, True
        super().__init__(layers=[_RaggedCacheLayer(self, i) for i in range(len(ragged.keys))])


class HFModuleRunner:
    """Prefill and one-token decode through the model's own modules (any architecture on the Cache API)."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.attn_impl = config._attn_implementation
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"NativeEngine's hf backend needs attn_implementation 'sdpa' or 'eager', "
                             f"got {self.attn_impl!r}")
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                raise ValueError(f"NativeEngine does not support models with {name} (found in {type(model).__name__})")
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def ensure_ready(self, max_len: int) -> None:
        pass

    def release(self) -> None:
        pass

    def pack(self) -> None:  # the model's own modules run their own matmuls
        pass

    def unpack(self) -> None:
        pass

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.attn_impl == "sdpa":
            return allowed
        # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere.
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)

    def _forward(self, ids, mask, positions, adapter) -> torch.Tensor:
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=adapter,
                        use_cache=True)
        return out.last_hidden_state

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: RaggedKVCache) -> torch.Tensor:
        prompts, length = ids.shape
        device = ids.device
        dtype = self.lm_head.weight.dtype
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()[None, None]
        positions = torch.arange(length, device=device)[None].expand(prompts, length)
        adapter = _HFCacheAdapter(cache)
        hidden = self._forward(ids, self._mask(causal, dtype), positions, adapter)
        return self.lm_head(hidden[torch.arange(prompts, device=device), lengths - 1])

    def decode(self, tokens: torch.Tensor, cache: RaggedKVCache) -> torch.Tensor:
        adapter = _HFCacheAdapter(cache)
        adapter.prefilling = False
        live = torch.arange(cache.kv_len, device=tokens.device)
        allowed = (live[None] <= cache.positions[:, None])[:, None, None]
        hidden = self._forward(tokens[:, None], self._mask(allowed, self.lm_head.weight.dtype),
                               cache.positions[:, None], adapter)
        return self.lm_head(hidden[:, 0])


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class NativeEngine:
    """Embedded rollout engine for a Hugging Face causal LM (see the module docstring and rollout/base.py).

    Args:
        model: a transformers ``*ForCausalLM`` (the engine puts it in eval mode; with ``backend="fused"`` it
            re-binds the q/k/v and gate/up parameters as views of fused buffers, values unchanged).
        device, dtype: where and in what precision to run (the model is moved/cast once, here).
        backend: ``"auto"`` (fused for Llama/Qwen2/Qwen3/Mistral, else hf), ``"fused"`` or ``"hf"``.
        compact_below: compact the batch when the live rows fall to this fraction of the batch or less
            (0 disables compaction; 1 compacts whenever a row finishes).
        max_batch_rows: cap on rows (prompts x n) decoded together; prompts are processed in chunks.
        sampling_backend: passed to ``sample_tokens`` (``"auto"``: Triton on CUDA; on CPU the C++ op when it
            builds, else plain torch).
        pack_weights: the fused backend on CPU (fp32, bf16) runs its matmuls through oneDNN on copies of the
            weights packed at the start of each ``generate`` and dropped when it returns (``onednn_weights``).
        share_prompt_kv: the fused backend on CPU keeps a prompt's k/v once for its n samples and attends to it
            once per step (``prompt_kv``); else every sample row holds and reads its own copy.

    The engine keeps no KV cache between calls: each ``generate`` allocates a static cache sized for that
    call and frees it on return.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, backend: str = "auto", compact_below: float = 0.5,
                 max_batch_rows: int | None = None, sampling_backend: str = "auto", pack_weights: bool = True,
                 share_prompt_kv: bool = True) -> None:
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise ValueError("NativeEngine needs a transformers causal-LM model (with .config)")
        if backend not in ("auto", "fused", "hf"):
            raise ValueError(f"backend must be 'auto', 'fused' or 'hf', got {backend!r}")
        if not 0.0 <= compact_below <= 1.0:
            raise ValueError(f"compact_below must be in [0, 1], got {compact_below}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.config = model.config
        self.device = model.get_output_embeddings().weight.device
        self.dtype = model.get_output_embeddings().weight.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        model_type = getattr(self.config, "model_type", "")
        if backend == "auto":
            backend = "fused" if model_type in FUSED_MODEL_TYPES else "hf"
        if backend == "fused" and model_type not in FUSED_MODEL_TYPES:
            raise ValueError(f"the fused backend supports {sorted(FUSED_MODEL_TYPES)}, not {model_type!r}; "
                             "use backend='hf'")
        self.backend = backend
        with torch.no_grad():
            self.runner = FusedLlamaRunner(model, pack_weights) if backend == "fused" else HFModuleRunner(model)
        self.compact_below = compact_below
        self.share_prompt_kv = share_prompt_kv
        self.max_batch_rows = max_batch_rows
        self.sampling_backend = sampling_backend
        generation_config = getattr(model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        self.eos_token_id = eos if eos is not None else getattr(self.config, "eos_token_id", None)
        self._param_by_name = self._named_parameters()
        self._asleep = False
        self.last_update_bytes = 0  # what the last update_weights copied

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], temperatures: Sequence[float], n: int, max_new_tokens: int,
                 *, stop_token_ids: Sequence[int] | None = None, top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None,
                 seed: int | Sequence[int] | None = None) -> list[list[Sample]]:
        """Sample ``n`` responses per prompt; ``result[i][j]`` is the j-th sample of prompt i.

        Each prompt's samples use that prompt's temperature (0 = greedy). ``logprobs`` hold each sampled
        token's log-prob under the processed distribution (logits / T, then top-k, then top-p). A stop
        token ends a sample and is kept as its last token (finish_reason "stop"); ``stop_token_ids=None``
        means the model's EOS id(s), ``[]`` disables stopping.

        ``seed``: an int makes the identical call reproducible (one batched sampler call per step); one
        int per prompt makes each prompt's samples independent of the rest of the batch (how prompts are
        chunked, compacted or split across ranks); both modes make one sampler call per step.
        """
        if self._asleep:
            self.wake_up()
        temps, top_ks, top_ps = validate_generate_args(prompts, temperatures, n, max_new_tokens, top_k, top_p,
                                                       vocab_size=self.vocab_size)
        stops = resolve_stop_token_ids(stop_token_ids, self.eos_token_id)
        call_seed, prompt_seeds = resolve_seeds(seed, len(prompts))
        self._check_context_length(prompts, max_new_tokens)
        generator = None
        if call_seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(call_seed)
        chunk = len(prompts) if self.max_batch_rows is None else max(1, self.max_batch_rows // n)
        results: list[list[Sample]] = []
        with torch.inference_mode():
            try:
                self.runner.pack()  # per call: the weights change between calls, the packed copies never go stale
                for start in range(0, len(prompts), chunk):
                    end = start + chunk
                    results.extend(self._generate_chunk(
                        prompts[start:end], temps[start:end], n, max_new_tokens, stops,
                        None if top_ks is None else top_ks[start:end], None if top_ps is None else top_ps[start:end],
                        generator, None if prompt_seeds is None else prompt_seeds[start:end], first_index=start))
            finally:
                self.runner.unpack()
        return results

    def _check_context_length(self, prompts, max_new_tokens: int) -> None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None) or []
        uses_window = window is not None and (
            "sliding_attention" in layer_types or getattr(self.config, "model_type", "") == "mistral")
        if uses_window and longest > window:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the sliding window ({window}); "
                             "NativeEngine only runs full attention")

    def _generate_chunk(self, prompts, temps, n, max_new_tokens, stops, top_ks, top_ps, generator, prompt_seeds,
                        first_index: int) -> list[list[Sample]]:
        device = self.device
        num_prompts = len(prompts)
        rows = num_prompts * n
        lengths_list = [len(p) for p in prompts]
        longest = max(lengths_list)
        max_len = longest + max_new_tokens

        self.runner.ensure_ready(max_len)
        runner = self.runner
        if n > 1 and self.share_prompt_kv and self.backend == "fused" and device.type == "cpu":
            cache = SharedPromptKVCache(runner.num_layers, num_prompts, n, runner.num_kv_heads,
                                        torch.as_tensor(lengths_list), max_new_tokens, runner.head_dim, self.dtype,
                                        device)
        else:
            cache = RaggedKVCache(runner.num_layers, rows, runner.num_kv_heads, max_len, runner.head_dim, self.dtype,
                                  device)
            cache.num_prompts = num_prompts
        sampling = _RowSampling(temps, top_ks, top_ps, n, device, generator, prompt_seeds, self.sampling_backend)

        logits = self._prefill(prompts, lengths_list, cache)
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)
        row_ids = torch.arange(rows, device=device)  # live batch position -> output row
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens, logprobs = sampling.sample(logits, 0)
        del logits

        out_tokens = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
        out_logprobs = torch.empty(rows, max_new_tokens, dtype=torch.float32, device=device)
        gen_len = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        stop_ids = torch.as_tensor(stops, dtype=torch.long, device=device) if stops else None
        positions = torch.as_tensor(lengths_list, device=device).repeat_interleave(n)
        compacted = False

        for t in range(max_new_tokens):
            if compacted:
                out_tokens[row_ids, t] = tokens
                out_logprobs[row_ids, t] = logprobs
            else:
                out_tokens[:, t] = tokens
                out_logprobs[:, t] = logprobs
            if stop_ids is not None:
                hit = torch.isin(tokens, stop_ids) & ~done
                gen_len.index_put_((row_ids[hit],), torch.tensor(t + 1, device=device))
                stopped.index_fill_(0, row_ids[hit], True)
                done |= hit
                live = len(done) - int(done.sum())
                if live == 0:
                    break
                if live < len(done) and live <= self.compact_below * len(done):
                    keep = (~done).nonzero().squeeze(1)
                    cache.keep_rows(keep)
                    sampling.keep_rows(keep)
                    row_ids, tokens, positions = row_ids[keep], tokens[keep], positions[keep]
                    done = done[keep]
                    compacted = True
            if t == max_new_tokens - 1:
                break
            cache.positions = positions
            cache.kv_len = longest + t + 1  # >= every row's position + 1; extra slots are masked
            logits = self.runner.decode(tokens, cache).float()
            positions = positions + 1
            tokens, logprobs = sampling.sample(logits, t + 1)

        return _groups(out_tokens, out_logprobs, gen_len, stopped, n, first_index)

    def _prefill(self, prompts, lengths_list: list[int], cache: RaggedKVCache) -> torch.Tensor:
        """Each prompt's last-position logits [num_prompts, V] (fp32), prefilling the cache in length buckets."""
        device = self.device
        logits = torch.empty(len(prompts), self.vocab_size, dtype=torch.float32, device=device)
        for bucket in length_buckets(lengths_list):  # prefill batches of similar prompt length
            width = lengths_list[bucket[0]]
            ids = torch.zeros(len(bucket), width, dtype=torch.long)
            for row, i in enumerate(bucket):
                ids[row, : lengths_list[i]] = torch.as_tensor(prompts[i], dtype=torch.long)
            index = torch.as_tensor(bucket, device=device)
            cache.prefill_prompts = index
            bucket_lengths = torch.as_tensor([lengths_list[i] for i in bucket], device=device)
            logits[index] = self.runner.prefill(ids.to(device), bucket_lengths, cache).float()
        return logits

    # ---- weights and memory ------------------------------------------------------------------------

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        # remove_duplicate=False keeps both names of a tied weight (lm_head.weight and embed_tokens.weight).
        return dict(self.model.named_parameters(remove_duplicate=False))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the model's parameters by name; returns how many were copied (or already there).

        A tensor that IS the parameter's memory (an engine sharing the learner's parameters) is not copied.

        Names are the model's own (``model.named_parameters()``), either name of a tied weight works, and
        ``_orig_mod.``/``module.`` wrapper prefixes are ignored. An unknown name or a shape mismatch raises
        before that tensor is copied (tensors copied earlier in the same call stay copied).
        """
        count = copied = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self._param_by_name.get(strip_wrappers(name))
                if param is None:
                    raise KeyError(f"update_weights: the model has no parameter named {name!r}")
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model's is {tuple(param.shape)}")
                if not _same_memory(param, tensor):  # the learner's own parameter (shared weights): nothing to copy
                    param.copy_(tensor)  # in place, so fused views and tied aliases see it
                    copied += param.numel() * param.element_size()
                count += 1
        self.last_update_bytes = copied
        return count

    def update_adapters(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """LoRA adapters by the model's own names (``...lora_A.default.weight``): the model carries the adapters
        and applies them in its forward, so they are parameters like the others (see :meth:`update_weights`)."""
        return self.update_weights(named_tensors)

    def sleep(self, level: int | None = None) -> None:
        """Free transient buffers (RoPE tables, allocator cache); the next generate() wakes the engine.

        ``level`` is accepted for interface parity with VLLMEngine; the weights always stay in place.
        """
        self.runner.release()
        self._asleep = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        self._asleep = False

    @property
    def is_sleeping(self) -> bool:
        return self._asleep


def _groups(out_tokens: torch.Tensor, out_logprobs: torch.Tensor, gen_len: torch.Tensor, stopped: torch.Tensor,
            n: int, first_index: int) -> list[list[Sample]]:
    """The per-row output buffers [rows, max_new_tokens] as groups of n Samples, cut at each row's length."""
    lens, stop_flags = gen_len.tolist(), stopped.tolist()
    token_rows, logprob_rows = out_tokens.tolist(), out_logprobs.tolist()
    results = []
    for i in range(len(lens) // n):
        group = []
        for j in range(n):
            r = i * n + j
            group.append(Sample(token_ids=token_rows[r][: lens[r]], logprobs=logprob_rows[r][: lens[r]],
                                finish_reason="stop" if stop_flags[r] else "length", prompt_index=first_index + i))
        results.append(group)
    return results


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements in memory (one is a detached alias of the other)."""
    return (a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


class _RowSampling:
    """Per-row sampling parameters (expanded from per-prompt ones) and the sampler call, one per step.

    Batched mode: the call's generator drives all rows. Per-prompt-seed mode: output row r = (prompt i,
    sample j) at decode step t draws with its own seed derive(derive(seed_i, j), t), a per-row
    counter-based stream in ``sample_tokens``, so its samples never depend on the rest of the batch (how
    prompts are chunked, compacted or split across ranks) and one batched call still serves every row.
    """

    def __init__(self, temps, top_ks, top_ps, n, device, generator, prompt_seeds, backend) -> None:
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device).repeat_interleave(n)
        self.top_k = None
        if top_ks is not None and any(k > 0 for k in top_ks):
            self.top_k = torch.tensor(top_ks, dtype=torch.long, device=device).repeat_interleave(n)
        self.top_p = None
        if top_ps is not None and any(p < 1.0 for p in top_ps):
            self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device).repeat_interleave(n)
        self.generator, self.backend = generator, backend
        self.row_seeds = None
        if prompt_seeds is not None:
            # Python ints of any size -> their low 64 bits as a signed int64 (the hash uses all 64).
            folded = [(s + (1 << 63)) % (1 << 64) - (1 << 63) for s in prompt_seeds]
            base = torch.tensor(folded, dtype=torch.int64, device=device).repeat_interleave(n)
            sample_index = torch.arange(len(folded) * n, device=device) % n
            self.row_seeds = derive_seeds(base, sample_index)

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.temperature = self.temperature[keep]
        self.top_k = None if self.top_k is None else self.top_k[keep]
        self.top_p = None if self.top_p is None else self.top_p[keep]
        self.row_seeds = None if self.row_seeds is None else self.row_seeds[keep]

    def sample(self, logits: torch.Tensor, step: int):
        """logits ``[live, V]`` for the live rows at decode step ``step``; returns (tokens, logprobs)."""
        if self.row_seeds is None:
            return sample_tokens(logits, self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 generator=self.generator, backend=self.backend)
        return sample_tokens(logits, self.temperature, top_k=self.top_k, top_p=self.top_p,
                             seed=derive_seeds(self.row_seeds, step), backend=self.backend)


# A prompt joins the current prefill batch while it is at least this fraction of the batch's longest prompt,
# so at most ~20% of a batch's prefill compute goes to padding; each extra batch costs one forward's overhead.
__all__ = ["NativeEngine", "RaggedKVCache", "FusedLlamaRunner", "HFModuleRunner", "FUSED_MODEL_TYPES"]
