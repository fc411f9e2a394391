"""VLLMEngine: colocated vLLM, in this process, for one device or torchrun SPMD (CUDA, or vLLM's CPU build).

Life cycle (the engine owns it; callers never pass sleep levels):

- ``generate(...)`` wakes whatever is asleep (weights, then KV cache) and samples with one
  ``SamplingParams`` per prompt (that prompt's temperature). It does not go back to sleep: a step may
  roll out several times (DAPO refill rounds, the sync probe, held-out evaluation).
- ``sleep()`` hands the device memory to the learner. It sleeps at the engine's ``sleep_level``: 2 (the
  default) discards the weights, because the learner's update replaces them anyway; 1 offloads them.
- ``update_weights(learner.named_weights())`` wakes the weight pool and reloads the learner's tensors in
  place, from memory. After a level-2 sleep it must cover every parameter before the next ``generate``.
- ``prompt_logprobs(...)`` scores a probe, so that ``base.verify_sync`` can check the engine really uses the new
  weights.

On a platform without sleep mode (vLLM's CPU build) ``sleep`` and ``wake_up`` keep the weights and only
track the state, so the same loop runs everywhere.

Weights go in through vLLM's supported in-place reload (the worker's ``reload_weights(weights_iterator=...)``,
vLLM >= 0.20; it re-runs each layer's post-load processing, e.g. the CPU build's pre-packed GEMMs), and
through ``model.load_weights`` on older releases. Either way the tensors are streamed, never written to disk.

vLLM runs in this process (``distributed_executor_backend="external_launcher"``, no engine
sub-process), which is what lets the reload read the learner's tensors in place. Under torchrun every
rank builds its own engine; with ``tensor_parallel_size > 1`` the ranks of one TP group must call
``generate``/``update_weights``/``prompt_logprobs`` together (prompts are gathered across the group).

vLLM is imported lazily: this module imports without it, and building an engine without it raises an
ImportError that says how to install it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from erpo_fast.distributed import free_port
from erpo_fast.errors import WeightSyncError

from .base import Sample, resolve_seeds, resolve_stop_token_ids, strip_wrappers, validate_generate_args

_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values

INSTALL_HINT = ("VLLMEngine needs vLLM: pip install 'erpo-fast[vllm]' on a CUDA machine, or run "
                "scripts/vllm_env.sh for vLLM's CPU build")
_SEED_SPACE = 1 << 32


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    # vLLM logs every request at INFO; a training run wants its warnings only (users can override). And it logs
    # to stdout by default, where `evaluate` prints its result: its messages go to stderr with ours.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def _prepare_external_launcher_env() -> None:
    """external_launcher expects torchrun's variables; a plain single-device process gets a 1-rank world."""
    # The engine core must live in this process, so that the reload sees our tensors without a copy.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if "RANK" not in os.environ:  # a LOCAL_RANK already set names the device (the async rollout process's GPU)
        os.environ.update(RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def _hf_parameter_names(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], list[set[str]], int]:
    """Parameter names/shapes of the checkpoint's HF model, built on the meta device (no memory, no disk
    weights), the groups of names that alias one tensor (tied embeddings), and the model's context length."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes, by_tensor = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(param.shape)
        by_tensor.setdefault(id(param), set()).add(name)
    return shapes, list(by_tensor.values()), int(getattr(config, "max_position_embeddings", 0) or 0)


def request_seed(prompt_seed: int, n: int) -> int:
    """The seed of one vLLM request of n samples.

    vLLM seeds sample j of a request with ``seed + j``. Spacing requests n apart keeps every
    (prompt, sample) pair of a call on its own stream: prompt seeds that differ modulo 2**32 never share one.
    """
    return (int(prompt_seed) % _SEED_SPACE) * n


def seeded_chunked_prefill_works(device_type: str) -> bool:
    """Can vLLM split a seeded request's prefill over several scheduler steps on this device?

    It samples a request whose prefill is still partial, discards that token and rewinds the request's seeded
    generator with ``Generator.set_offset``. A CPU generator has no offset ("CPU Generator does not use
    offset"), so on vLLM's CPU build any generate call holding more prompt tokens than one step's budget
    (``max_num_batched_tokens``, 4,096 there) crashed. CUDA generators (Philox) have an offset.
    """
    try:
        torch.Generator(device=device_type).get_offset()
    except RuntimeError:
        return False
    return True


def _no_chunked_prefill(max_model_len: int | None, llm_kwargs: dict) -> dict:
    """vLLM arguments that schedule every prefill whole (see ``seeded_chunked_prefill_works``). The step budget
    must hold the longest sequence; below that vLLM's own default (4,096 on CPU) is kept."""
    budget = llm_kwargs.get("max_num_batched_tokens") or max(4096, max_model_len or 0)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def _worker_reload_takes_iterator(worker) -> bool:
    """Feature check, run on the worker: does it offer the in-place ``reload_weights(weights_iterator=...)``?"""
    reload = getattr(worker, "reload_weights", None)
    runner_reload = getattr(getattr(worker, "model_runner", None), "reload_weights", None)
    for fn in (runner_reload, reload):
        if fn is not None:
            try:
                if "weights_iterator" in inspect.signature(fn).parameters:
                    return True
            except (TypeError, ValueError):
                continue
    return False


def _refresh_tied_layers(worker) -> int:
    """Re-run post-load processing of layers whose weight is another layer's (a tied LM head).

    The reload loads the embedding, but the tied LM head receives no tensor of its own, so derived state
    built from it at load time (vLLM's CPU build pre-packs the head's GEMM) would keep the old weights.
    """
    model = worker.model_runner.get_model()
    owners, refreshed = set(), 0
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or weight.is_meta:
            continue
        method = getattr(module, "quant_method", None)
        if id(weight) in owners and method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
            refreshed += 1
        owners.add(id(weight))
    return refreshed


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's per-sync "<Layer>: Failed to load weights" warnings for layers that never receive a
    checkpoint tensor: rotary embeddings, and a tied LM head (its weight is the embedding's, refreshed by
    ``_refresh_tied_layers``). Any other layer's warning still shows."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.endswith(": Failed to load weights"):
            return True
        layer = message.split(":", 1)[0]
        return not (layer.endswith("RotaryEmbedding") or (self.tied and layer == "ParallelLMHead"))


class _ExpectedChunkedPrefillWarning(logging.Filter):
    """Drops vLLM's "does not officially support disabling chunked prefill" warning, which it prints for any
    model when chunked prefill is turned off. Here it is off only where seeded chunked prefill crashes (see
    ``seeded_chunked_prefill_works``); vLLM's CPU platform turns it off itself for MLA models."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "support disabling chunked prefill" not in record.getMessage()


@contextlib.contextmanager
def _shield_from_kernel_scan(active: bool):
    """Hide, while vLLM starts, module attributes that break its CPU build's kernel-override scan.

    vLLM's CPU worker (0.32) rebinds Triton kernels by scanning every module's namespace and calling
    ``vars(value).get(...)`` on each value that has a ``__dict__``. Some objects answer ``__dict__`` through
    ``__getattr__`` with something that is not a mapping (numba's llvmlite ``ffi.lib``), and the engine then
    fails to start with an AttributeError. Such attributes are removed for the duration and put back after.
    """
    hidden = []
    if active:
        with warnings.catch_warnings():  # probing deprecated module attributes warns
            warnings.simplefilter("ignore")
            _find_scan_breakers(hidden)
    try:
        yield
    finally:
        for namespace, attr, value in hidden:
            namespace.setdefault(attr, value)


def _find_scan_breakers(hidden: list) -> None:
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            try:
                breaks_scan = hasattr(value, "__dict__") and not hasattr(vars(value), "get")
            except Exception:  # objects whose attribute access raises are left as they are
                continue
            if breaks_scan:
                hidden.append((namespace, attr, value))
                del namespace[attr]


def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids: Sequence[int]) -> torch.Tensor:
    """The learner-side reference for ``prompt_logprobs`` (checked by ``base.verify_sync``): log p(token_t | tokens_<t)
    at T=1 for t = 1..L-1, in fp32 (plain torch)."""
    ids = torch.as_tensor(list(prompt_ids), device=next(model.parameters()).device)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].cpu()


class VLLMEngine:
    """Colocated vLLM rollout engine (see the module docstring).

    Args:
        model: a LOCAL Hugging Face model directory (config, safetensors, tokenizer).
        dtype: vLLM weight/activation dtype.
        gpu_memory_utilization: fraction of the GPU vLLM may take while awake (weights + KV cache); the
            learner uses the rest while the engine sleeps. Ignored by the CPU build.
        cpu_kv_cache_gib: KV-cache size of vLLM's CPU build (``VLLM_CPU_KVCACHE_SPACE``, unless already set).
        cpu_threads: threads vLLM's CPU build pins (cores 0..k-1, ``VLLM_CPU_OMP_THREADS_BIND``, unless already
            set). It pins every core by default and then ignores ``torch.set_num_threads`` in this process,
            so the learner's thread count (``trainer.threads``) is passed here.
        max_model_len: longest prompt + response; keeps the KV cache small.
        tensor_parallel_size: devices per engine (torchrun ranks per TP group).
        sleep_level: what ``sleep()`` frees: 1 offloads the weights to CPU memory, 2 discards them (the
            learner's next sync replaces them anyway).
        bucket_bytes: on vLLM releases without the in-place reload, weights are handed to
            ``load_weights`` in buckets of about this many bytes.
        lora: a LoRA policy's ``ModelConfig`` (rank, alpha, targets) when its adapters are to be served as adapters
            (:meth:`update_adapters`, vLLM's LoRA support); None: the weights alone (also merged LoRA weights).
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager``, ``max_num_seqs``).
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                 gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0, cpu_threads: int | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                 sleep_level: int = 2, bucket_bytes: int = 256 << 20,
                 enable_prefix_caching: bool = True, lora=None, **llm_kwargs) -> None:
        model_dir = Path(model).expanduser()
        vllm = _import_vllm()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"VLLMEngine needs a local model directory with config.json, got {str(model)!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        from vllm.platforms import current_platform

        self.platform = "cpu" if current_platform.is_cpu() else str(getattr(current_platform, "device_type", "gpu"))
        # Sleep mode needs the CUDA (or ROCm/XPU) memory allocator; elsewhere vLLM refuses the flag.
        self.sleep_mode = bool(current_platform.is_sleep_mode_available())
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gib:g}")
            if cpu_threads:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if cpu_threads == 1 else f"0-{cpu_threads - 1}")
        _prepare_external_launcher_env()
        self._vllm = vllm
        self.model_dir = model_dir
        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_level, self.bucket_bytes = sleep_level, bucket_bytes
        self._param_shapes, self._alias_groups, context = _hf_parameter_names(model_dir)
        if max_model_len is not None and context:
            max_model_len = min(max_model_len, context)
        self._tp_group = self._make_tp_group(tensor_parallel_size)
        self.chunked_prefill = seeded_chunked_prefill_works(str(current_platform.device_type))
        if not self.chunked_prefill and "enable_chunked_prefill" not in llm_kwargs:
            llm_kwargs.update(_no_chunked_prefill(max_model_len or context or None, llm_kwargs))
            args_log = logging.getLogger("vllm.engine.arg_utils")
            if not any(isinstance(f, _ExpectedChunkedPrefillWarning) for f in args_log.filters):
                args_log.addFilter(_ExpectedChunkedPrefillWarning())
        rank = int(os.environ.get("RANK", "0"))
        self._lora, self._lora_request, self._lora_dir = lora, None, None
        if lora is not None:
            llm_kwargs.update(enable_lora=True, max_loras=1,
                              max_lora_rank=min(r for r in _VLLM_LORA_RANKS if r >= lora.lora_rank))
        with _shield_from_kernel_scan(current_platform.is_cpu()):
            self.llm = vllm.LLM(
                model=str(model_dir), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="external_launcher", enable_sleep_mode=self.sleep_mode,
                # Sampled-token log-probs after temperature/top-k/top-p: what the learner recomputes.
                logprobs_mode="processed_logprobs",
                # Ranks of one TP group must sample identically; different groups must differ.
                seed=seed + rank // tensor_parallel_size,
                enable_prefix_caching=enable_prefix_caching, **llm_kwargs)
        self.last_update_bytes = 0
        self.reload_in_place = bool(self.llm.collective_rpc(_worker_reload_takes_iterator)[0])
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _ExpectedReloadWarnings) for f in reload_log.filters):
            reload_log.addFilter(_ExpectedReloadWarnings(tied=any(len(g) > 1 for g in self._alias_groups)))
        self.eos_token_id = self._read_eos(model_dir)
        self._awake = {"weights", "kv_cache"}
        self._weights_current = True  # fresh from the checkpoint
        self._ever_synced = False
        self._discarded = False  # weights dropped (level-2 sleep, failed update): a full update must follow
        self._synced_since_discard: set[str] = set()

    # ---- construction helpers ----------------------------------------------------------------------

    @staticmethod
    def _make_tp_group(tp: int):
        if tp == 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1 needs torchrun with torch.distributed initialised")
        world = dist.get_world_size()
        if world % tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must divide the world size ({world})")
        group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])
        return group

    @staticmethod
    def _read_eos(model_dir: Path):
        try:
            from transformers import GenerationConfig

            return GenerationConfig.from_pretrained(model_dir).eos_token_id
        except (OSError, ValueError):
            from transformers import AutoConfig

            return getattr(AutoConfig.from_pretrained(model_dir), "eos_token_id", None)

    # ---- memory ------------------------------------------------------------------------------------

    def sleep(self, level: int | None = None) -> None:
        """Free device memory for the learner: the KV cache, and the weights (offloaded at level 1,
        discarded at level 2). ``level`` defaults to the engine's ``sleep_level``.

        After a level-2 sleep the next ``generate`` needs a full ``update_weights`` first. Without sleep
        mode (CPU build) nothing is freed and the weights stay valid.
        """
        level = self.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self._awake:
            return
        if self.sleep_mode:
            self.llm.sleep(level=level)
            if level == 2:
                self._weights_current = False
                self._discarded = True
                self._synced_since_discard.clear()
        self._awake.clear()

    def wake_up(self) -> None:
        """Re-allocate weights then KV cache (weights discarded by a level-2 sleep still need a sync)."""
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self._awake:
            return
        if self.sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the learner's cached blocks back before vLLM maps its pool
            self.llm.wake_up(tags=[tag])
        self._awake.add(tag)

    @property
    def is_sleeping(self) -> bool:
        return not self._awake

    # ---- weights -----------------------------------------------------------------------------------

    def _vllm_model(self) -> torch.nn.Module:
        """The in-process vLLM model object (for releases without the in-place reload)."""
        model = self.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]
        while not hasattr(model, "load_weights") and hasattr(model, "runnable"):
            model = model.runnable  # compilation/CUDA-graph wrappers
        if not hasattr(model, "load_weights"):
            raise RuntimeError(f"cannot find load_weights on vLLM's model ({type(model).__name__})")
        return model

    def _checked(self, named_tensors: Iterable[tuple[str, torch.Tensor]], names: set[str]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names and shapes checked one tensor at a time, so a gathered (FSDP) model is never whole."""
        for raw_name, tensor in named_tensors:
            name = strip_wrappers(raw_name)
            shape = self._param_shapes.get(name)
            if shape is None:
                raise KeyError(f"update_weights: the checkpoint has no parameter named {raw_name!r}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"update_weights: {raw_name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            names.add(name)
            self.last_update_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor.detach()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload the learner's tensors (HF names) into vLLM in place, from memory; returns how many.

        Tensors may be on any device and in any dtype (vLLM casts while copying). After a level-2 sleep the
        update must cover every parameter before the next ``generate``. A bad name or shape raises, and the
        engine then needs a full update.
        """
        self._wake("weights")
        names: set[str] = set()
        self.last_update_bytes = 0
        self._weights_current = False  # until this update completes
        stream = self._checked(named_tensors, names)
        try:
            if self.reload_in_place:
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
                self.llm.collective_rpc(_refresh_tied_layers)
            else:
                self._load_in_buckets(stream)
        except BaseException:
            # Some layers may hold new weights and others old ones: only a full update makes it whole again.
            self._ever_synced = True
            self._discarded = True
            self._synced_since_discard.clear()
            raise
        self._ever_synced = True
        self._synced_since_discard |= names
        # A partial update (a LoRA policy's adapted layers) is whole when nothing was dropped before it.
        if self._discarded and not self._missing_after_discard():
            self._discarded = False
        self._weights_current = not self._discarded
        # Cached prefixes hold k/v computed with the old weights.
        self.llm.reset_prefix_cache()
        return len(names)

    def update_adapters(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Serve a new version of the LoRA adapters (the learner's parameter names, ``...lora_A.default.weight``):
        written as a PEFT folder in a private temporary directory and used from the next ``generate`` on, under a
        new ``LoRARequest`` id (vLLM caches adapters by id). Needs ``lora=`` at construction. Returns how many
        tensors."""
        import tempfile

        from erpo_fast.lora import save_adapters

        if self._lora is None:
            raise RuntimeError("update_adapters needs an engine built with lora=<the policy's ModelConfig>")
        tensors = {name: t.detach() for name, t in named_tensors}
        if self._lora_dir is None:
            self._lora_dir = tempfile.TemporaryDirectory(prefix="erpo-lora-")
        version = 1 if self._lora_request is None else self._lora_request.lora_int_id + 1
        folder = Path(self._lora_dir.name) / f"v{version}"
        save_adapters(folder, tensors, self._lora, base_model=str(self.model_dir))
        from vllm.lora.request import LoRARequest

        previous, self._lora_request = self._lora_request, LoRARequest(f"policy-v{version}", version, str(folder))
        if previous is not None:  # one adapter at a time: drop the old version (and its folder)
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.last_update_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.llm.reset_prefix_cache()
        return len(tensors)

    def _load_in_buckets(self, stream: Iterator[tuple[str, torch.Tensor]]) -> None:
        model = self._vllm_model()
        bucket, size = [], 0
        for name, tensor in stream:
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                model.load_weights(weights=bucket)
                bucket, size = [], 0
        if bucket:
            model.load_weights(weights=bucket)

    def _missing_after_discard(self) -> list[str]:
        return [sorted(group)[0] for group in self._alias_groups if not group & self._synced_since_discard]

    def _ready_for_generation(self) -> None:
        self._wake("weights")
        if not self._weights_current:
            if self._ever_synced:
                missing = self._missing_after_discard()
                example = f" (e.g. {missing[0]!r})" if missing else ""
                raise RuntimeError(f"vLLM's weights were discarded by sleep(level=2) or a failed update, and "
                                   f"{len(missing)} parameters{example} have not been re-synced; call "
                                   "update_weights with the learner's full weights before generate")
            # Never synced: the checkpoint on disk is the current policy.
            self.llm.collective_rpc("reload_weights")
            self._weights_current = True
        self._wake("kv_cache")

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], temperatures: Sequence[float], n: int, max_new_tokens: int,
                 *, stop_token_ids: Sequence[int] | None = None, top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None,
                 seed: int | Sequence[int] | None = None) -> list[list[Sample]]:
        """Same contract as NativeEngine.generate (see rollout/base.py); wakes the engine if it sleeps.

        Seeds: an int makes the identical call reproducible (prompt i uses seed + i); per-prompt seeds make
        each prompt's samples independent of the rest of the batch. Either way every (prompt, sample) pair
        of the call has its own random stream (see ``request_seed``).
        """
        temps, top_ks, top_ps = validate_generate_args(prompts, temperatures, n, max_new_tokens, top_k, top_p)
        stops = None if stop_token_ids is None else resolve_stop_token_ids(stop_token_ids, self.eos_token_id)
        call_seed, prompt_seeds = resolve_seeds(seed, len(prompts))
        if call_seed is not None:
            prompt_seeds = [call_seed + i for i in range(len(prompts))]
        requests = [(list(map(int, p)), t, None if top_ks is None else top_ks[i],
                     None if top_ps is None else top_ps[i],
                     None if prompt_seeds is None else request_seed(prompt_seeds[i], n))
                    for i, (p, t) in enumerate(zip(prompts, temps))]
        all_requests, mine = self._gather_tp(requests)
        self._ready_for_generation()
        params = [self._sampling_params(t, k, p, n, max_new_tokens, stops, s) for _, t, k, p, s in all_requests]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, *_ in all_requests], sampling_params=params,
                                    use_tqdm=False, lora_request=self._lora_request)
        results = [self._to_samples(out, request[1], n, index)
                   for index, (out, request) in enumerate(zip(outputs, all_requests))]
        return results[mine]

    def _sampling_params(self, temperature, top_k, top_p, n, max_new_tokens, stops, seed):
        kwargs = dict(n=n, temperature=temperature, max_tokens=max_new_tokens, logprobs=0, detokenize=False,
                      seed=seed)
        if top_k:
            kwargs["top_k"] = top_k
        if top_p is not None and top_p < 1.0:
            kwargs["top_p"] = top_p
        if stops is not None:  # an explicit list replaces the model's EOS
            kwargs.update(stop_token_ids=stops, ignore_eos=True)
        return self._vllm.SamplingParams(**kwargs)

    @staticmethod
    def _to_samples(request_output, temperature: float, n: int, prompt_index: int) -> list[Sample]:
        completions = sorted(request_output.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, expected {n}")
        samples = []
        for c in completions:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished a sample with reason {c.finish_reason!r}")
            tokens = list(c.token_ids)
            if temperature == 0.0:
                logprobs = [0.0] * len(tokens)  # greedy: a point mass (vLLM reports log_softmax of the logits)
            else:
                logprobs = [float(step[token].logprob) for token, step in zip(tokens, c.logprobs)]
            samples.append(Sample(tokens, logprobs, c.finish_reason, prompt_index=prompt_index))
        return samples

    def _gather_tp(self, requests):
        """With TP, every rank of the group must run the same requests: gather them, keep our slice."""
        if self._tp_group is None:
            return requests, slice(None)
        import torch.distributed as dist

        gathered = [None] * self.tensor_parallel_size
        dist.all_gather_object(gathered, requests, group=self._tp_group)
        rank = dist.get_rank(group=self._tp_group)
        start = sum(len(g) for g in gathered[:rank])
        return [r for g in gathered for r in g], slice(start, start + len(requests))

    def close(self) -> None:
        """Shut vLLM down now (its engine core and distributed state) rather than at garbage collection, so
        that another engine can be built in this process."""
        llm, self.llm = self.llm, None
        if self._lora_dir is not None:
            self._lora_dir.cleanup()
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # ---- sync check --------------------------------------------------------------------------------

    def prompt_logprobs(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """The engine's log p(token_t | tokens_<t) at T=1 for t = 1..L-1 (fp32, CPU)."""
        ids = [int(t) for t in prompt_ids]
        if len(ids) < 2:
            raise ValueError("the probe prompt needs at least 2 tokens")
        self._ready_for_generation()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([{"prompt_token_ids": ids}], sampling_params=params, use_tqdm=False,
                                   lora_request=self._lora_request)
        return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))],
                            dtype=torch.float32)


__all__ = ["INSTALL_HINT", "VLLMEngine", "WeightSyncError", "request_seed", "teacher_forced_logprobs",
           "vllm_available"]
