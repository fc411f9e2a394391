"""Test-wide setup: Triton runs through its interpreter on CPU, and `gpu` tests skip without CUDA.

`triton_device` is where ``backend="triton"`` tests put their tensors: CUDA when there is one (compiled
kernels, which reject CPU pointers), else the CPU under the interpreter. One fixture, so the same tests run
on both; `on_backend_device` moves a test's inputs for a given backend (only "triton" moves).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so that @triton.jit kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    # `vllm` tests run wherever vLLM imports (its CPU build in .venv-vllm, or a GPU machine). Without it they
    # skip with the reason shown, except where ERPO_REQUIRE_VLLM=1 (scripts/test.sh's vLLM stage): there a
    # missing vLLM is a failure, never a silent pass.
    has_vllm = _vllm_importable()
    if not has_vllm and os.environ.get("ERPO_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("ERPO_REQUIRE_VLLM=1 but vLLM does not import in this environment")
    skip_vllm = pytest.mark.skip(reason="needs vLLM, not installed in this environment; scripts/test.sh runs "
                                        "these in .venv-vllm with vLLM's CPU build (scripts/vllm_env.sh)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

def kernel_device() -> torch.device:
    """The device the Triton kernels run on in this process (see the module docstring)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def triton_device() -> torch.device:
    return kernel_device()


@pytest.fixture
def on_backend_device():
    """``move(backend, *tensors)``: the tensors on the device that ``backend`` runs on (a tuple, or one tensor)."""
    def move(backend: str, *tensors):
        dev = kernel_device() if backend == "triton" else torch.device("cpu")
        out = tuple(None if t is None else t.to(dev) for t in tensors)
        return out[0] if len(out) == 1 else out

    return move


@pytest.fixture(autouse=True)
def one_thread():
    """Test shapes are tiny: one intra-op thread is faster, and far faster on a shared, oversubscribed CPU.
    (Tests that are about threading set their own count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_model(directory, *, seed: int = 1):
    """A user's model folder: a tiny random-weight Qwen2 (hidden 32, 1 layer) and the character tokenizer."""
    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = BuiltinConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    build_tiny_qwen2(tok, cfg, seed=seed).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# Tiny Llama-family (and one non-fused) models for the engine tests. Large-ish init so the next-token distributions
# are far from uniform (the chi-square controls need it).
TINY_VOCAB = 96
TINY_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def tiny_causal_lm(kind: str, attn: str = "sdpa", seed: int = 0):
    """llama (untied, q/k/v biases), qwen2-tied, qwen3 (per-head q/k norms, tied), mistral, or gemma (not a fused
    architecture: (1 + w) norms, scaled embeddings, GeGLU), random weights from ``seed``, in eval mode."""
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**TINY_COMMON, tie_word_embeddings=False, attention_bias=True))
        elif kind == "qwen2-tied":
            model = Qwen2ForCausalLM(Qwen2Config(**TINY_COMMON, tie_word_embeddings=True))
        elif kind == "qwen3":
            model = Qwen3ForCausalLM(Qwen3Config(**TINY_COMMON, head_dim=16, tie_word_embeddings=True))
        elif kind == "mistral":
            model = MistralForCausalLM(MistralConfig(**TINY_COMMON))
        elif kind == "gemma":
            model = GemmaForCausalLM(GemmaConfig(**TINY_COMMON, head_dim=16))
        else:
            raise ValueError(kind)
    model.config._attn_implementation = attn
    return model.eval()
