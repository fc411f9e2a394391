"""VLLMEngine: colocated vLLM with sleep mode, for one GPU or torchrun SPMD (GPU only).

Life cycle of one training step (what the trainer drives):

1. ``update_weights(learner.named_parameters())``: wakes the weight pool (``wake_up(tags=["weights"])``)
   and copies the learner's tensors, in buckets and straight from memory, into the vLLM model through its
   own ``load_weights`` (which maps Hugging Face names onto vLLM's fused/sharded parameters).
   ``verify_sync(...)`` then checks that the engine really samples from the new weights.
2. ``generate(...)``: wakes the KV-cache pool, samples with one ``SamplingParams`` per prompt (that
   prompt's temperature), then sleeps at ``sleep_level`` (2 by default: weights and KV cache freed).

A level-2 sleep discards the weights, so the next ``generate`` needs a full ``update_weights`` first.
The engine never reloads weights from disk once the learner has synced them (that would silently roll
the policy back to the base checkpoint); before the first sync the disk weights *are* the current ones.

vLLM runs in this process (``distributed_executor_backend="external_launcher"``, no engine
sub-process), which is what lets ``load_weights`` read the learner's tensors in place. Under torchrun
every rank builds its own engine; with ``tensor_parallel_size > 1`` the ranks of one TP group must call
``generate``/``update_weights``/``verify_sync`` together (prompts are gathered across the group).

vLLM is imported lazily: this module imports without it, and building an engine without it raises an
ImportError that says how to install it. Nothing here has been run in this repository's CI (no GPU).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .base import Sample, resolve_seeds, resolve_stop_token_ids, validate_generate_args

INSTALL_HINT = "VLLMEngine needs vLLM: pip install 'erpo-fast[vllm]'"
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class WeightSyncError(RuntimeError):
    """The engine's log-probs on the probe prompt do not match the learner's: the weight sync failed."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_external_launcher_env() -> None:
    """external_launcher expects torchrun's variables; a plain single-GPU process gets a 1-rank world."""
    # The engine core must live in this process, so that load_weights sees our tensors without a copy.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _hf_parameter_names(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """Parameter names/shapes of the checkpoint's HF model, built on the meta device (no memory, no disk
    weights), and the groups of names that alias one tensor (tied embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes, by_tensor = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(param.shape)
        by_tensor.setdefault(id(param), set()).add(name)
    return shapes, list(by_tensor.values())


def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids: Sequence[int]) -> torch.Tensor:
    """Reference for ``verify_sync``: log p(token_t | tokens_<t) at T=1 for t = 1..L-1, in fp32 (plain torch)."""
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
            learner uses the rest while the engine sleeps.
        max_model_len: longest prompt + response; keeps the KV cache small.
        tensor_parallel_size: GPUs per engine (torchrun ranks per TP group).
        sleep_level: 1 offloads weights to CPU (no re-sync needed), 2 discards them (re-sync each step).
        auto_sleep: sleep after every ``generate`` (the colocated default).
        bucket_bytes: weights are handed to vLLM in buckets of about this many bytes.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager``, ``max_num_seqs``).
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                 gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                 sleep_level: int = 2, auto_sleep: bool = True, bucket_bytes: int = 256 << 20,
                 enable_prefix_caching: bool = True, **llm_kwargs) -> None:
        vllm = _import_vllm()
        model_dir = Path(model).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"VLLMEngine needs a local model directory with config.json, got {str(model)!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        _prepare_external_launcher_env()
        self._vllm = vllm
        self.model_dir = model_dir
        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_level, self.auto_sleep, self.bucket_bytes = sleep_level, auto_sleep, bucket_bytes
        self._tp_group = self._make_tp_group(tensor_parallel_size)
        rank = int(os.environ.get("RANK", "0"))
        self.llm = vllm.LLM(
            model=str(model_dir), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher", enable_sleep_mode=True,
            # Sampled-token log-probs after temperature/top-k/top-p: what the learner recomputes.
            logprobs_mode="processed_logprobs",
            # Ranks of one TP group must sample identically; different groups must differ.
            seed=seed + rank // tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching, **llm_kwargs)
        self._param_shapes, self._alias_groups = _hf_parameter_names(model_dir)
        self.eos_token_id = self._read_eos(model_dir)
        self._awake = {"weights", "kv_cache"}
        self._weights_current = True  # fresh from the checkpoint
        self._ever_synced = False
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
        """Free GPU memory: KV cache always; weights offloaded (level 1) or discarded (level 2).

        ``level`` defaults to the engine's ``sleep_level``. After a level-2 sleep the next ``generate`` needs
        a full ``update_weights`` first, so a sleep between a sync and the rollout that should use it must be
        level 1 (e.g. after a post-sync check).
        """
        level = self.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self._awake:
            return
        self.llm.sleep(level=level)
        self._awake.clear()
        if level == 2:
            self._weights_current = False
            self._synced_since_discard.clear()

    def wake_up(self) -> None:
        """Re-allocate weights then KV cache (weights discarded by a level-2 sleep still need a sync)."""
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self._awake:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the learner's cached blocks back before vLLM maps its pool
        self.llm.wake_up(tags=[tag])
        self._awake.add(tag)

    @property
    def is_sleeping(self) -> bool:
        return not self._awake

    # ---- weights -----------------------------------------------------------------------------------

    def _vllm_model(self) -> torch.nn.Module:
        """The in-process vLLM model object (the one its forward passes use)."""
        executor = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", None) or worker  # WorkerWrapperBase -> Worker
        runner = getattr(worker, "model_runner", None)
        if runner is None:
            # Fallback: ask the worker directly (a direct call with the in-process executor).
            runner = self.llm.collective_rpc(lambda w: w.model_runner)[0]
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        while not hasattr(model, "load_weights") and hasattr(model, "runnable"):
            model = model.runnable  # compilation/CUDA-graph wrappers
        if not hasattr(model, "load_weights"):
            raise RuntimeError(f"cannot find load_weights on vLLM's model ({type(model).__name__})")
        return model

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load the learner's tensors (HF names) into vLLM, bucketed, from memory; returns how many.

        Tensors may be on any device and in any dtype (vLLM casts while copying). After a level-2 sleep the
        update must cover every parameter before the next ``generate``.
        """
        self._wake("weights")
        model = self._vllm_model()
        bucket, bucket_size, count = [], 0, 0
        names = set()
        for raw_name, tensor in named_tensors:
            name = _strip_wrappers(raw_name)
            shape = self._param_shapes.get(name)
            if shape is None:
                raise KeyError(f"update_weights: the checkpoint has no parameter named {raw_name!r}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"update_weights: {raw_name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            bucket.append((name, tensor.detach()))
            bucket_size += tensor.numel() * tensor.element_size()
            names.add(name)
            count += 1
            if bucket_size >= self.bucket_bytes:
                model.load_weights(weights=bucket)
                bucket, bucket_size = [], 0
        if bucket:
            model.load_weights(weights=bucket)
        self._ever_synced = True
        self._synced_since_discard |= names
        if not self._weights_current and not self._missing_after_discard():
            self._weights_current = True
        # Cached prefixes hold k/v computed with the old weights.
        self.llm.reset_prefix_cache()
        return count

    def _missing_after_discard(self) -> list[str]:
        return [sorted(group)[0] for group in self._alias_groups if not group & self._synced_since_discard]

    def _ready_for_generation(self) -> None:
        self._wake("weights")
        if not self._weights_current:
            if self._ever_synced:
                missing = self._missing_after_discard()
                raise RuntimeError(f"vLLM's weights were discarded by sleep(level=2) and {len(missing)} parameters "
                                   f"(e.g. {missing[0]!r}) have not been re-synced; call update_weights with "
                                   "the learner's full weights before generate")
            # Never synced: the checkpoint on disk is the current policy.
            self.llm.collective_rpc("reload_weights")
            self._weights_current = True
        self._wake("kv_cache")

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], temperatures: Sequence[float], n: int, max_new_tokens: int,
                 *, stop_token_ids: Sequence[int] | None = None, top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None,
                 seed: int | Sequence[int] | None = None) -> list[list[Sample]]:
        """Same contract as NativeEngine.generate (see rollout/base.py); sleeps afterwards if auto_sleep.

        vLLM seeds each request on its own, so an int seed becomes seed + prompt index and per-prompt seeds
        are used as given; either way a prompt's samples do not depend on the rest of the batch.
        """
        temps, top_ks, top_ps = validate_generate_args(prompts, temperatures, n, max_new_tokens, top_k, top_p)
        stops = None if stop_token_ids is None else resolve_stop_token_ids(stop_token_ids, self.eos_token_id)
        call_seed, prompt_seeds = resolve_seeds(seed, len(prompts))
        if call_seed is not None:
            prompt_seeds = [call_seed + i for i in range(len(prompts))]
        requests = [(list(map(int, p)), t, None if top_ks is None else top_ks[i],
                     None if top_ps is None else top_ps[i], None if prompt_seeds is None else prompt_seeds[i])
                    for i, (p, t) in enumerate(zip(prompts, temps))]
        all_requests, mine = self._gather_tp(requests)
        self._ready_for_generation()
        params = [self._sampling_params(t, k, p, n, max_new_tokens, stops, s) for _, t, k, p, s in all_requests]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, *_ in all_requests], sampling_params=params,
                                    use_tqdm=False)
        results = [self._to_samples(out, request[1], n, index)
                   for index, (out, request) in enumerate(zip(outputs, all_requests))]
        if self.auto_sleep:
            self.sleep()
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

    # ---- sync check --------------------------------------------------------------------------------

    def prompt_logprobs(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """The engine's log p(token_t | tokens_<t) at T=1 for t = 1..L-1 (fp32, CPU)."""
        ids = [int(t) for t in prompt_ids]
        if len(ids) < 2:
            raise ValueError("the probe prompt needs at least 2 tokens")
        self._ready_for_generation()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([{"prompt_token_ids": ids}], sampling_params=params, use_tqdm=False)
        return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))],
                            dtype=torch.float32)

    def verify_sync(self, probe_prompt_ids: Sequence[int], reference_logprobs, atol: float = 0.02) -> dict:
        """Check that the engine scores a fixed probe like the learner does (T=1); raise WeightSyncError if not.

        ``reference_logprobs``: the learner's log p(token_t | tokens_<t) for t = 1..L-1 (e.g. from
        ``teacher_forced_logprobs``). The mean absolute difference must be <= atol (a mean, because bf16
        kernels differ by a few hundredths on single tokens; a stale-weight engine differs everywhere).
        """
        got = self.prompt_logprobs(probe_prompt_ids)
        reference = torch.as_tensor(reference_logprobs, dtype=torch.float32).flatten().cpu()
        if reference.shape != got.shape:
            raise ValueError(f"reference_logprobs has {reference.numel()} values; the probe needs {got.numel()} "
                             "(one per prompt token after the first)")
        diff = (got - reference).abs()
        stats = {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())}
        if stats["mean_abs_diff"] > atol:
            raise WeightSyncError(f"vLLM does not match the learner on the probe prompt: mean |diff| = "
                                  f"{stats['mean_abs_diff']:.4f} > atol {atol} (max {stats['max_abs_diff']:.4f}); "
                                  "the engine is not sampling from the synced weights")
        return stats


def _strip_wrappers(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


__all__ = ["INSTALL_HINT", "VLLMEngine", "WeightSyncError", "teacher_forced_logprobs", "vllm_available"]
