"""Model loading and building: a local Hugging Face causal LM, or the built-in tiny Qwen2.

The trainer never computes [tokens, vocab] logits. It runs the decoder to its last hidden state
(:func:`last_hidden_state`, final norm included) and hands that, with the output-embedding weight
(:func:`lm_head_weight`), to the fused log-prob / loss kernels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from erpo_fast.choices import ATTN_IMPLEMENTATIONS
from erpo_fast.errors import ModelLoadError, first_line

from .config import BuiltinConfig

__all__ = [
    "ModelLoadError",
    "build_tiny_qwen2",
    "decoder",
    "last_hidden_state",
    "lm_head_weight",
    "load_model",
    "own_memory",
    "resolve_attn_implementation",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Any one of these marks a directory that AutoTokenizer can load offline.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _quiet_transformers() -> None:
    # transformers draws "Loading weights" / "Writing model shards" bars at every load and checkpoint; in a
    # training log they are noise (and carriage-return spam when stderr is a file).
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "auto") -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; otherwise the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_attn_implementation(attn_implementation: str, device: str | torch.device = "auto") -> str:
    """``auto`` -> flash_attention_2 on CUDA when the flash_attn package is importable, else sdpa."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; choose one of: "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation != "auto":
        return attn_implementation
    if resolve_device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str | Path, *, dtype: str | torch.dtype = "auto", attn_implementation: str = "auto",
               device: str | torch.device = "auto"):
    """Load ``(model, tokenizer)`` from a LOCAL Hugging Face directory (never the hub).

    Raises :class:`ModelLoadError` with a one-line message for a missing path, a file instead of a directory,
    a directory without ``config.json`` or without tokenizer files, or a checkpoint transformers rejects.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()  # also quiets the checkpoints' save_pretrained later in this process

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {p}")
    if not p.is_dir():
        raise ModelLoadError(f"model path is not a directory: {p}")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model directory has no config.json: {p}")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"model directory has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): {p}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        # A loading option, not a property of the tokenizer: save_pretrained would write it into the export's
        # tokenizer_config.json, and the export would then refuse to load anything from the Hub for its user.
        tokenizer.init_kwargs.pop("local_files_only", None)
    except Exception as e:  # transformers raises many types; the caller needs one clear line
        raise ModelLoadError(f"cannot load the tokenizer from {p}: {first_line(e)}") from e
    try:
        # use_kernels=False: with the Hub's `kernels` installed, transformers >= 5.x kernelizes by default (kernel
        # code fetched from the Hub at run time) and again at every train()/eval() switch, which puts its own
        # RMSNorm forward back over lean_layers' (the one the memory plan counts).
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch_dtype,
                                                     attn_implementation=attn, use_kernels=False)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model from {p}: {first_line(e)}") from e
    if dev.type == "cpu":
        own_memory(model)
    return model.to(dev), tokenizer


def own_memory(model: nn.Module) -> None:
    """Copy parameters and buffers that are views of a memory-mapped checkpoint into the process's own memory.

    transformers maps the safetensors file and, on CPU in the file's dtype, the tensors stay views of that
    mapping: every page the run touches then counts in its resident memory, and keeps counting after the
    weights are replaced (the fused engine's q/k/v buffers, the optimizer's writes), while the file stays
    mapped (measured at Qwen2.5-0.5B's shape: 2.2 GB of file pages resident beside the trained copy). A copy
    tensor by tensor releases the mapping at the end; each tensor's file pages are also dropped from this
    process as soon as it is copied (``madvise(MADV_DONTNEED)``: the file can always give them back), so the
    load never holds the weights twice (it did: a 4.37 GB peak for the 1.98 GB of Qwen2.5-0.5B's shape, above a
    LoRA run's whole training working set).
    """
    release = _file_page_releaser()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            source = t.data
            t.data = source.clone()
            release(source)


def _file_page_releaser():
    """A function that drops the whole pages of a tensor's memory from this process when that memory lies in a
    mapping of a ``.safetensors`` file (a no-op elsewhere: anonymous memory would lose its data). Only for a tensor
    just copied and no longer used: a dropped page of a private mapping reads as the file again."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        with open("/proc/self/maps") as f:
            files = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f
                     if len(line.split()) >= 6 and line.split()[5].endswith(".safetensors")]
    except OSError:
        return lambda t: None
    page = mmap.PAGESIZE

    def release(t: Tensor) -> None:
        if not t.is_contiguous():
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(a <= start and end <= b for a, b in files):
            return
        first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours keep theirs
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED

    return release


def build_tiny_qwen2(tokenizer, cfg: BuiltinConfig, seed: int, *, max_position_embeddings: int = 512,
                     attn_implementation: str = "sdpa"):
    """A tiny random-weight Qwen2 sized by the ``builtin.*`` tiny-model knobs, vocabulary = ``len(tokenizer)``, tied
    embeddings.

    Initialisation is deterministic in ``seed`` (a private generator state; the global RNG is restored).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _quiet_transformers()

    if cfg.hidden_size % cfg.heads:
        raise ValueError(f"builtin.hidden_size ({cfg.hidden_size}) must be divisible by "
                         f"builtin.heads ({cfg.heads})")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"builtin.heads ({cfg.heads}) must be divisible by builtin.kv_heads "
                         f"({cfg.kv_heads})")
    if (cfg.hidden_size // cfg.heads) % 2:
        head = cfg.hidden_size // cfg.heads
        raise ValueError(f"head size {head} (builtin.hidden_size / builtin.heads) must be even (rotary)")
    vocab = len(tokenizer)
    if vocab < 2:
        raise ValueError(f"tokenizer vocabulary is too small ({vocab} tokens)")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        use_cache=False,
    )
    config._attn_implementation = attn_implementation
    # fork_rng: seeding must not disturb the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(torch.float32)


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder of a ``*ForCausalLM`` (``model.model`` for Qwen2/Llama/Mistral...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if base is None:
        raise ValueError(f"{type(model).__name__} has no base decoder (expected a *ForCausalLM model)")
    return base


def lm_head_weight(model: nn.Module) -> Tensor:
    """The ``[V, H]`` output-embedding weight (the input embedding itself when tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm head)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm heads with a bias are not supported by the fused log-prob kernels")
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):  # a LoRA-adapted head: its effective weight
        from erpo_fast.lora import lora_layer_weight

        return lora_layer_weight(head)
    return head.weight


def last_hidden_state(model: nn.Module, input_ids: Tensor, position_ids: Tensor,
                      attention_mask: Tensor | None = None) -> Tensor:
    """Run the decoder (final norm included) to its last hidden state ``[B, L, H]``; never computes logits.

    Packed rows: pass ``attention_mask=None`` and ``position_ids`` that restart at 0 for every sequence;
    transformers then derives a block-diagonal causal mask (sdpa/eager) or varlen boundaries (flash-attn).
    """
    out = decoder(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=False)
    return out.last_hidden_state
