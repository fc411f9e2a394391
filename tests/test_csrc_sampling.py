"""The C++ op torch.ops.erpo_fast.sample_tokens: registration, dtypes, thread-count independence, its
selection paths (heap / nth_element top-k, histogram-narrowed top-p, large kept sets), and the loader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from erpo_fast.kernels.sampling import processed_logprobs_reference, sample_tokens

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def op():
    from erpo_fast.csrc import load_ops

    load_ops()  # a build failure here fails the tests: CI machines have a compiler
    return torch.ops.erpo_fast.sample_tokens


def _args(B: int, V: int, seed: int, dtype=torch.float32, scale: float = 2.5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * scale).to(dtype)
    T = torch.rand(B, generator=g) * 1.5 + 0.3
    T[::6] = 0.0
    top_k = torch.zeros(B, dtype=torch.int64)
    top_p = torch.ones(B)
    top_k[1::6] = 40  # heap path
    top_k[2::6] = V // 2  # nth_element path (k > 512), many tokens kept
    top_p[3::6] = 0.9  # histogram-narrowed quickselect
    top_k[4::6], top_p[4::6] = 100, 0.8  # both
    return logits, T, top_k, top_p


def _check_against_reference(logits, T, top_k, top_p, tokens, logprobs, atol):
    ref = processed_logprobs_reference(logits, T, top_k, top_p)
    ref_tok = ref.gather(1, tokens[:, None]).squeeze(1)
    assert torch.isfinite(ref_tok).all(), "sampled a token outside top-k / top-p"
    torch.testing.assert_close(logprobs.double(), ref_tok, atol=atol, rtol=1e-5)
    greedy = T == 0
    assert torch.equal(tokens[greedy], logits[greedy].float().argmax(1))
    assert torch.all(logprobs[greedy] == 0)


def test_op_is_registered(op):
    schema = str(torch.ops.erpo_fast.sample_tokens.default._schema)
    assert "sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, int seed)" in schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key("erpo_fast::sample_tokens", "CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_selection_paths_match_reference(op, dtype):
    logits, T, top_k, top_p = _args(24, 5000, seed=1, dtype=dtype)
    tokens, logprobs = op(logits, T, top_k, top_p, 123)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    _check_against_reference(logits, T, top_k, top_p, tokens, logprobs, atol=5e-5)


def test_flat_distribution_top_p_keeps_most_tokens(op):
    # Nearly flat logits: the top-p set is most of the vocabulary, so the op takes its chunked path.
    logits, T, top_k, top_p = _args(8, 3000, seed=2, scale=0.05)
    T[:] = 1.0
    top_k[:] = 0
    top_p[:] = 0.95
    tokens, logprobs = op(logits, T, top_k, top_p, 5)
    _check_against_reference(logits, T, top_k, top_p, tokens, logprobs, atol=5e-5)


@pytest.mark.parametrize("case", ["kept-list", "multi-chunk"])
def test_chi_square_list_and_multi_chunk_paths(op, case):
    # The V=12 chi-square in test_sampling.py runs single-chunk passes; these cover the per-token kept-list
    # path (few tokens kept out of many) and the cross-chunk merge (mass over several 2048-column chunks).
    from scipy.stats import chisquare

    n, V = 20000, 6000
    cols = torch.tensor([3, 700, 2047, 2048, 2049, 4100, 5999])
    row = torch.full((V,), -30.0 if case == "kept-list" else -torch.inf)
    row[cols] = torch.tensor([1.0, 0.2, 1.5, -0.3, 0.8, 0.1, 1.2])
    T = torch.full((n,), 0.9)
    top_k = torch.full((n,), 5 if case == "kept-list" else 0)
    top_p = torch.full((n,), 0.95 if case == "kept-list" else 1.0)
    tokens, _ = op(row.expand(n, V).contiguous(), T, top_k, top_p, 2024)
    expected = processed_logprobs_reference(row[None], T[:1], top_k[:1], top_p[:1]).exp()[0]
    support = expected > 1e-12
    counts = torch.bincount(tokens, minlength=V)
    assert counts[~support].sum() == 0
    assert chisquare(counts[support].numpy(), (expected[support] * n).numpy()).pvalue > 1e-3


def test_multithreaded_equals_single_threaded(op):
    logits, T, top_k, top_p = _args(32, 9000, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(logits, T, top_k, top_p, 77)
        torch.set_num_threads(4)
        many = op(logits, T, top_k, top_p, 77)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0])
    assert torch.equal(one[1], many[1])  # bit-identical: fixed chunking and merge order


def test_rows_do_not_depend_on_the_rest_of_the_batch(op):
    logits, T, top_k, top_p = _args(12, 2000, seed=4)
    full = op(logits, T, top_k, top_p, 9)
    # Row r draws its noise from (seed, r, column): the same row index gives the same token alone.
    for r in (0, 3, 7):
        mask = torch.arange(12) == r
        alone = op(logits.masked_fill(~mask[:, None], 0.0), torch.where(mask, T, 0.0), top_k, top_p, 9)
        assert alone[0][r] == full[0][r]


def test_large_k_ties_and_minus_inf(op):
    logits = torch.randn(6, 1500)
    logits[:, 100:700] = 0.25  # a wide tie block straddling the k-th value
    logits[:, -50:] = -torch.inf
    T = torch.full((6,), 0.8)
    top_k = torch.tensor([600, 650, 1000, 1490, 1499, 3])
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.99, 1.0, 1.0])
    tokens, logprobs = op(logits, T, top_k, top_p, 1)
    _check_against_reference(logits, T, top_k, top_p, tokens, logprobs, atol=5e-5)


def test_auto_backend_uses_csrc_on_cpu(op):
    logits, T, top_k, top_p = _args(8, 300, seed=5)
    auto = sample_tokens(logits, T, top_k=top_k, top_p=top_p, seed=11)
    direct = op(logits, T, top_k, top_p, 11)
    assert torch.equal(auto[0], direct[0])


def test_fake_tensor_shapes(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(5, 100)
        tokens, logprobs = op(logits, torch.ones(5), torch.zeros(5, dtype=torch.int64), torch.ones(5), 0)
    assert tokens.shape == (5,) and tokens.dtype == torch.int64 and logprobs.dtype == torch.float32


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    from erpo_fast.csrc import cache_dir

    monkeypatch.delenv("ERPO_FAST_CACHE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert cache_dir(False).parent == tmp_path / "te"
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path / "ef"))
    assert cache_dir(False).parent == tmp_path / "ef" / "torch_extensions"
    assert "cpu" in cache_dir(False).name and torch.__version__.split("+")[0] in cache_dir(False).name


def test_auto_falls_back_to_torch_when_the_build_fails(tmp_path):
    code = (
        "import torch\n"
        "from erpo_fast.kernels.sampling import sample_tokens\n"
        "z = torch.randn(3, 50)\n"
        "a = sample_tokens(z, 1.0, seed=1)\n"
        "b = sample_tokens(z, 1.0, seed=1)\n"
        "c = sample_tokens(z, 1.0, seed=1, backend='torch')\n"
        "assert torch.equal(a[0], c[0]) and torch.equal(b[0], c[0])\n"
    )
    env = dict(os.environ, ERPO_FAST_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("erpo_fast C++ ops unavailable") == 1


def test_rowseed_op_registered_and_keys_rows_by_their_seed_alone(op):
    schema = str(torch.ops.erpo_fast.sample_tokens_rowseed.default._schema)
    assert "sample_tokens_rowseed(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds)" \
        in schema
    rowseed = torch.ops.erpo_fast.sample_tokens_rowseed
    logits, T, top_k, top_p = _args(18, 3000, seed=6)  # every selection path, and two 2048-column chunks
    seeds = torch.randint(-2**62, 2**62, (18,), generator=torch.Generator().manual_seed(1))
    tokens, logprobs = rowseed(logits, T, top_k, top_p, seeds)
    _check_against_reference(logits, T, top_k, top_p, tokens, logprobs, atol=5e-5)
    # Row r's stream is row_key(seeds[r], 0): the one-seed op's stream for row 0 with seed seeds[r].
    for r in range(18):
        alone = op(logits[r:r + 1], T[r:r + 1], top_k[r:r + 1], top_p[r:r + 1], int(seeds[r]))
        assert alone[0][0] == tokens[r] and alone[1][0] == logprobs[r]


def test_rowseed_op_thread_count_independent_and_checks_seeds(op):
    rowseed = torch.ops.erpo_fast.sample_tokens_rowseed
    logits, T, top_k, top_p = _args(24, 5000, seed=8)
    seeds = torch.arange(24, dtype=torch.int64) * 1000003
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rowseed(logits, T, top_k, top_p, seeds)
        torch.set_num_threads(4)
        many = rowseed(logits, T, top_k, top_p, seeds)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    with pytest.raises(RuntimeError, match="seeds must be"):
        rowseed(logits, T, top_k, top_p, seeds[:3])
    with pytest.raises(RuntimeError, match="int64"):
        rowseed(logits, T, top_k, top_p, seeds.int())


def test_rowseed_fake_tensor_shapes(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tokens, logprobs = torch.ops.erpo_fast.sample_tokens_rowseed(
            torch.empty(5, 100), torch.ones(5), torch.zeros(5, dtype=torch.int64), torch.ones(5),
            torch.zeros(5, dtype=torch.int64))
    assert tokens.shape == (5,) and tokens.dtype == torch.int64 and logprobs.dtype == torch.float32


def test_cuda_build_targets_this_device_arch(monkeypatch, tmp_path):
    """The CUDA build compiles one arch, this device's (or the caller's TORCH_CUDA_ARCH_LIST), and the arch is in
    the cache key, so a build for one GPU is never loaded on another. Device queries are faked (no GPU here)."""
    import erpo_fast.csrc as csrc

    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert csrc.cuda_arch_list() == "9.0"
    hopper = csrc.cache_dir(True).name
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    ampere = csrc.cache_dir(True).name
    assert "sm9.0" in hopper and "sm8.0" in ampere and hopper != ampere
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert csrc.cuda_arch_list() == "8.0;9.0+PTX" and "sm8.0-9.0_PTX" in csrc.cache_dir(True).name
    assert "sm" not in csrc.cache_dir(False).name.split("_cpu")[-1]


def test_prebuild_in_background_and_ahead_of_time(op):
    """`prebuild_in_background` builds/loads on a thread; `python -m erpo_fast.csrc` builds ahead and says where."""
    import erpo_fast.csrc as csrc

    thread = csrc.prebuild_in_background()
    thread.join(timeout=600)
    assert not thread.is_alive() and csrc.ops_available()
    done = subprocess.run([sys.executable, "-m", "erpo_fast.csrc"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ops ready in" in done.stdout and str(csrc.cache_dir(False)) in done.stdout
