"""sample_tokens per backend: distribution (chi-square), processed log-probs, greedy rows, seeds, validation.

Expected distributions come from an independent float64 numpy implementation of the documented rules
(`expected_probs` below), not from the package's own reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    from scipy.stats import chisquare
except ImportError:  # the lent GPU image has no scipy: the same Pearson statistic, p from torch's gamma function
    from types import SimpleNamespace

    def chisquare(f_obs, f_exp):
        obs, exp = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (f_obs, f_exp))
        stat = ((obs - exp) ** 2 / exp).sum()
        dof = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
        return SimpleNamespace(statistic=float(stat), pvalue=float(torch.special.gammaincc(dof, stat / 2)))

from erpo_fast.kernels.sampling import kept_mask_reference, processed_logprobs_reference, sample_tokens
from erpo_fast.kernels.sampling.torch_sampler import kept_thresholds
from erpo_fast.kernels.sampling.triton_kernels import kept_thresholds_triton

BACKENDS = ["reference", "torch", "triton", "csrc"]
P_MIN = 1e-3  # chi-square acceptance threshold (the seeds are fixed, so each outcome is deterministic)


@pytest.fixture
def sample(on_backend_device):
    """`sample_tokens` with its tensor arguments on the device ``backend`` runs on (CUDA for triton on a GPU,
    the interpreter's CPU otherwise) and its results back on the CPU, so one test body serves both."""
    def run(logits, temperature, *, backend, **kwargs):
        def move(x):
            return on_backend_device(backend, x) if isinstance(x, torch.Tensor) else x

        tokens, logprobs = sample_tokens(move(logits), move(temperature), backend=backend,
                                         **{k: move(v) for k, v in kwargs.items()})
        assert tokens.device == logprobs.device == move(logits).device
        return tokens.cpu(), logprobs.cpu()

    return run


def expected_probs(z: np.ndarray, T: float, k: int, p: float) -> np.ndarray:
    """Float64 processed distribution: temperature, top-k (ties kept), top-p (crossing token kept)."""
    z = np.asarray(z, dtype=np.float64)
    V = z.size
    if T == 0:
        out = np.zeros(V)
        out[np.argmax(z)] = 1.0
        return out
    desc = np.sort(z)[::-1]
    keep = np.ones(V, dtype=bool)
    if 0 < k < V:
        keep &= z >= desc[k - 1]
    if p < 1:
        w = np.exp(np.where(keep, z / T, -np.inf) - (z[keep] / T).max())
        w /= w.sum()
        before = 0.0  # mass of strictly larger logits, walking distinct values downwards
        for value in np.unique(z[keep])[::-1]:
            if before >= p:
                keep &= z > value
                break
            before += w[z == value].sum()
    w = np.where(keep, np.exp(z / T - (z[keep] / T).max()), 0.0)
    return w / w.sum()


def _skip_if_csrc_unavailable(backend: str) -> None:
    if backend == "csrc":
        import shutil

        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler on this machine")


# A 12-token row whose top-k / top-p boundaries sit well away from ties and rounding (checked below).
ROW = np.array([2.1, -0.4, 1.3, 0.2, -1.7, 3.0, 0.9, -0.9, 1.8, -2.5, 0.5, -0.1], dtype=np.float32)
# (temperature, top_k, top_p) per group of draws; groups 0 and 1 also serve the negative control.
GROUPS = [(0.3, 0, 1.0), (1.0, 0, 1.0), (2.5, 6, 1.0), (1.5, 0, 0.8), (1.0, 8, 0.7)]


def test_expected_probs_boundaries_are_unambiguous():
    for T, k, p in GROUPS:
        if p < 1:
            probs = np.sort(expected_probs(ROW, T, k, 1.0))[::-1]
            exclusive = np.cumsum(probs) - probs
            assert np.min(np.abs(exclusive - p)) > 0.01


def _assert_groups_follow_processed_distribution(tokens, n, backend):
    """Group i's n draws (rows i*n..(i+1)*n) stay in its kept set and pass chi-square; returns the counts."""
    counts = [np.bincount(tokens[i * n:(i + 1) * n].numpy(), minlength=ROW.size) for i in range(len(GROUPS))]
    for (t, kk, pp), c in zip(GROUPS, counts):
        expected = expected_probs(ROW, t, kk, pp)
        support = expected > 0
        assert c[~support].sum() == 0, f"sampled outside the kept set for {(t, kk, pp)}"
        pvalue = chisquare(c[support], expected[support] * n).pvalue
        assert pvalue > P_MIN, f"{backend} {(t, kk, pp)}: p = {pvalue:.2e}"
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_per_row_temperature_top_k_top_p(sample, backend):
    _skip_if_csrc_unavailable(backend)
    n = 2000 if backend == "triton" else 20000  # the Triton interpreter is slow; 2000 draws still has power
    T = torch.tensor([g[0] for g in GROUPS]).repeat_interleave(n)
    k = torch.tensor([g[1] for g in GROUPS]).repeat_interleave(n)
    p = torch.tensor([g[2] for g in GROUPS]).repeat_interleave(n)
    logits = torch.from_numpy(ROW).expand(len(T), -1).contiguous()
    tokens, _ = sample(logits, T, top_k=k, top_p=p, seed=1234, backend=backend)
    counts = _assert_groups_follow_processed_distribution(tokens, n, backend)
    # Negative control: the T=1.0 draws must be rejected as draws from the T=0.3 distribution, so the test
    # above is able to fail.
    wrong = expected_probs(ROW, *GROUPS[0])
    assert chisquare(counts[1], wrong * n).pvalue < 1e-6


def _random_batch(B: int, V: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2.5
    logits[:, :4] = logits[:, 4:5]  # ties, including at top-k boundaries below
    T = torch.rand(B, generator=g) * 2 + 0.2
    T[::5] = 0.0  # greedy rows mixed in
    top_k = torch.randint(-3, V + 3, (B,), generator=g)
    top_k[1::4] = 5  # ties with the 5th value for some rows
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    top_p[::3] = 1.0
    return logits.to(dtype), T, top_k, top_p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_processed_distribution(sample, backend, dtype):
    _skip_if_csrc_unavailable(backend)
    logits, T, top_k, top_p = _random_batch(24, 300, seed=7, dtype=dtype)
    tokens, logprobs = sample(logits, T, top_k=top_k, top_p=top_p, seed=3, backend=backend)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    ref = processed_logprobs_reference(logits, T, top_k, top_p)
    ref_tok = ref.gather(1, tokens[:, None]).squeeze(1)
    assert torch.isfinite(ref_tok).all(), "sampled a token outside top-k / top-p"
    torch.testing.assert_close(logprobs.double(), ref_tok, atol=2e-5, rtol=1e-5)
    greedy = T == 0
    assert torch.equal(tokens[greedy], logits[greedy].float().argmax(1))
    assert torch.all(logprobs[greedy] == 0)


def test_reference_logprobs_independent_check():
    logits, T, top_k, top_p = _random_batch(12, 40, seed=11)
    ref = processed_logprobs_reference(logits, T, top_k, top_p)
    for i in range(12):
        e = expected_probs(logits[i].numpy(), float(T[i]), int(top_k[i]), float(top_p[i]))
        np.testing.assert_allclose(ref[i].exp().numpy(), e, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selection_thresholds_match_sort_based_mask(on_backend_device, backend):
    thresholds = kept_thresholds_triton if backend == "triton" else kept_thresholds
    logits, T, top_k, top_p = _random_batch(32, 257, seed=5)
    T[T == 0] = 1.0
    logits[3] = torch.linspace(-1, 1, 257)  # flat row: the torch backend's full-sort fallback
    top_p[3] = 0.97
    mask = logits >= thresholds(*on_backend_device(backend, logits, T, top_k, top_p)).cpu()[:, None]
    assert torch.equal(mask, kept_mask_reference(logits, T, top_k, top_p))


def test_triton_multi_tile_matches_single_tile(on_backend_device):
    from erpo_fast.kernels.sampling.triton_kernels import sample_tokens_triton

    logits, T, top_k, top_p = on_backend_device("triton", *_random_batch(8, 200, seed=2))
    one = sample_tokens_triton(logits, T, top_k, top_p, seed=9, block=256)
    tiles = sample_tokens_triton(logits, T, top_k, top_p, seed=9, block=64, rows=8)
    assert torch.equal(one[0], tiles[0])
    torch.testing.assert_close(one[1], tiles[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_generator_reproducible(sample, backend):
    _skip_if_csrc_unavailable(backend)
    logits, T, top_k, top_p = _random_batch(64, 100, seed=4)
    T = T + 0.5  # no greedy rows: they would match regardless of the seed
    a = sample(logits, T, top_k=top_k, top_p=top_p, seed=17, backend=backend)[0]
    b = sample(logits, T, top_k=top_k, top_p=top_p, seed=17, backend=backend)[0]
    c = sample(logits, T, top_k=top_k, top_p=top_p, seed=18, backend=backend)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = sample(logits, T, top_k=top_k, top_p=top_p, generator=g1, backend=backend)[0]
    e = sample(logits, T, top_k=top_k, top_p=top_p, generator=g2, backend=backend)[0]
    assert torch.equal(d, e)


def test_scalar_and_tensor_arguments_agree():
    logits, *_ = _random_batch(6, 50, seed=8)
    B = logits.shape[0]
    a = sample_tokens(logits, 0.7, top_k=10, top_p=0.9, seed=1, backend="torch")
    b = sample_tokens(logits, torch.full((B,), 0.7), top_k=torch.full((B,), 10), top_p=torch.full((B,), 0.9),
                      seed=1, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_invalid_rows_raise(sample, backend):
    _skip_if_csrc_unavailable(backend)
    for bad_value in (float("nan"), float("inf")):
        logits = torch.randn(3, 20)
        logits[1, 7] = bad_value
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            sample(logits, torch.tensor([1.0, 0.0, 1.0]), seed=0, backend=backend)
    logits = torch.randn(2, 20)
    logits[0] = -torch.inf
    with pytest.raises(ValueError, match="no finite"):
        sample(logits, 1.0, top_k=5, seed=0, backend=backend)


def test_minus_inf_logits_are_never_sampled():
    logits = torch.randn(2000, 10)
    logits[:, ::2] = -torch.inf
    tokens, logprobs = sample_tokens(logits, 3.0, seed=0, backend="torch")
    assert (tokens % 2 == 1).all() and torch.isfinite(logprobs).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=torch.randn(5), temperature=1.0), "2-D"),
        (dict(logits=torch.randn(2, 0), temperature=1.0), "empty vocabulary"),
        (dict(logits=torch.randint(0, 5, (2, 5)), temperature=1.0), "floating point"),
        (dict(logits=torch.randn(2, 5), temperature=-1.0), "temperature"),
        (dict(logits=torch.randn(2, 5), temperature=float("nan")), "temperature"),
        (dict(logits=torch.randn(2, 5), temperature=torch.ones(3)), "shape"),
        (dict(logits=torch.randn(2, 5), temperature=1.0, top_p=0.0), "top_p"),
        (dict(logits=torch.randn(2, 5), temperature=1.0, top_p=1.5), "top_p"),
        (dict(logits=torch.randn(2, 5), temperature=1.0, top_k=torch.tensor([1.5, 2.0])), "integers"),
        (dict(logits=torch.randn(2, 5), temperature=1.0, backend="cuda"), "backend"),
        (dict(logits=torch.randn(2, 5), temperature=1.0, seed=1.5), "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "csrc", "torch"])
def test_cuda_backends_match_reference(backend):
    logits, T, top_k, top_p = _random_batch(64, 4096, seed=3, dtype=torch.bfloat16)
    logits, T, top_k, top_p = (x.cuda() for x in (logits, T, top_k, top_p))
    tokens, logprobs = sample_tokens(logits, T, top_k=top_k, top_p=top_p, seed=3, backend=backend)
    ref = processed_logprobs_reference(logits, T, top_k, top_p)
    ref_tok = ref.gather(1, tokens[:, None]).squeeze(1)
    assert torch.isfinite(ref_tok).all()
    torch.testing.assert_close(logprobs.double(), ref_tok, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[T == 0], logits[T == 0].float().argmax(1))


# ---- per-row seeds (seed = int64 [B] tensor) -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_per_row_seeds(sample, backend):
    # Every row has its own seed (consecutive integers: the hardest case for a weak seed hash) and draws once;
    # the draws of a group, across rows, must follow that group's processed distribution.
    _skip_if_csrc_unavailable(backend)
    n = {"triton": 2000, "reference": 1000}.get(backend, 20000)  # interpreter / per-row loop are slow
    T = torch.tensor([g[0] for g in GROUPS]).repeat_interleave(n)
    k = torch.tensor([g[1] for g in GROUPS]).repeat_interleave(n)
    p = torch.tensor([g[2] for g in GROUPS]).repeat_interleave(n)
    logits = torch.from_numpy(ROW).expand(len(T), -1).contiguous()
    seeds = torch.arange(len(T), dtype=torch.int64)
    tokens, _ = sample(logits, T, top_k=k, top_p=p, seed=seeds, backend=backend)
    counts = _assert_groups_follow_processed_distribution(tokens, n, backend)
    # Negative controls: T=1.0 draws judged as T=0.3 draws are rejected; one seed shared by every row of a
    # group gives one repeated token, which the same chi-square rejects.
    assert chisquare(counts[1], expected_probs(ROW, *GROUPS[0]) * n).pvalue < 1e-6
    same = sample(logits[:n], T[n:2 * n], seed=torch.full((n,), 5), backend=backend)[0]
    assert same.unique().numel() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_seed_token_depends_only_on_its_seed(sample, backend):
    _skip_if_csrc_unavailable(backend)
    logits, T, top_k, top_p = _random_batch(24, 300, seed=12)
    T = T + 0.5  # no greedy rows: they would match regardless of the seed
    g = torch.Generator().manual_seed(3)
    seeds = torch.randint(-2**62, 2**62, (24,), generator=g)
    tokens, logprobs = sample(logits, T, top_k=top_k, top_p=top_p, seed=seeds, backend=backend)
    ref = processed_logprobs_reference(logits, T, top_k, top_p).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), ref, atol=2e-5, rtol=1e-5)
    # Same seeds -> same tokens; permuted rows -> permuted tokens.
    assert torch.equal(sample(logits, T, top_k=top_k, top_p=top_p, seed=seeds, backend=backend)[0], tokens)
    perm = torch.randperm(24, generator=g)
    permuted = sample(logits[perm], T[perm], top_k=top_k[perm], top_p=top_p[perm], seed=seeds[perm],
                             backend=backend)[0]
    assert torch.equal(permuted, tokens[perm])
    # A few rows inside a different, smaller batch (other rows' logits and seeds unrelated) keep their tokens.
    rows = torch.tensor([7, 2, 19])
    other, T2, k2, p2 = _random_batch(5, 300, seed=99)
    idx = torch.tensor([1, 3, 4])
    other[idx], T2[idx], k2[idx], p2[idx] = logits[rows], T[rows], top_k[rows], top_p[rows]
    seeds2 = torch.tensor([11, 0, 12, 0, 0]).index_put((idx,), seeds[rows])
    mixed = sample(other, T2, top_k=k2, top_p=p2, seed=seeds2, backend=backend)[0]
    assert torch.equal(mixed[idx], tokens[rows])
    # Other seeds -> other tokens.
    assert not torch.equal(sample(logits, T, top_k=top_k, top_p=top_p, seed=seeds + 1,
                                         backend=backend)[0], tokens)


@pytest.mark.parametrize(
    "seed, match",
    [(torch.zeros(3, dtype=torch.int64), "shape"), (torch.zeros(2, 1, dtype=torch.int64), "shape"),
     (torch.zeros(2), "integers"), (torch.zeros(2, dtype=torch.bool), "integers")],
)
def test_bad_row_seeds(seed, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(torch.randn(2, 5), 1.0, seed=seed, backend="torch")
    with pytest.raises(ValueError, match="at most one"):
        sample_tokens(torch.randn(2, 5), 1.0, seed=torch.zeros(2, dtype=torch.int64), generator=torch.Generator())


def test_counter_rng_matches_python_integer_hash():
    from erpo_fast.kernels.sampling.counter_rng import mix32, uniforms

    def lowbias32(x: int) -> int:  # independent pure-Python version of the published hash
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    u = uniforms(torch.arange(64), 500)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    counts = torch.histc(u, bins=20, min=0, max=1).numpy()
    assert chisquare(counts, np.full(20, u.numel() / 20)).pvalue > P_MIN
    assert torch.equal(uniforms(torch.tensor([5, 9]), 300, col0=200)[1], uniforms(torch.tensor([9]), 500)[0, 200:])


def test_derive_seeds_spread_without_collisions():
    from erpo_fast.kernels.sampling import derive_seeds

    base = torch.tensor([0, 1, 2, -1, 2**40, 2**62 + 3], dtype=torch.int64)
    out = torch.stack([derive_seeds(derive_seeds(base, j), t) for j in range(8) for t in range(64)])
    assert out.unique().numel() == out.numel()  # every (seed, j, t) gets its own stream seed
    assert bool((out >= 0).all())
    assert torch.equal(derive_seeds(base, 3), derive_seeds(base, torch.full((6,), 3)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "csrc", "torch"])
def test_cuda_row_seeds_match_reference_and_ignore_batch_layout(backend):
    logits, T, top_k, top_p = _random_batch(64, 4096, seed=5, dtype=torch.bfloat16)
    T = T + 0.5
    seeds = torch.randint(-2**62, 2**62, (64,), generator=torch.Generator().manual_seed(2))
    logits, T, top_k, top_p, seeds = (x.cuda() for x in (logits, T, top_k, top_p, seeds))
    tokens, logprobs = sample_tokens(logits, T, top_k=top_k, top_p=top_p, seed=seeds, backend=backend)
    ref = processed_logprobs_reference(logits, T, top_k, top_p).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-4, rtol=1e-4)
    perm = torch.randperm(64, device="cuda")
    permuted = sample_tokens(logits[perm], T[perm], top_k=top_k[perm], top_p=top_p[perm], seed=seeds[perm],
                             backend=backend)[0]
    assert torch.equal(permuted, tokens[perm])


def test_triton_sampler_refuses_a_triton_older_than_3_4(monkeypatch):
    # Before 3.4, tl.randint with int64 offsets returned 64-bit Philox values; the noise needs 32-bit draws.
    import importlib.util

    import triton

    from erpo_fast.kernels.sampling import triton_kernels

    def load_as(version: str):
        monkeypatch.setattr(triton, "__version__", version)
        spec = importlib.util.spec_from_file_location("triton_kernels_copy", triton_kernels.__file__)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    with pytest.raises(ImportError, match=r"needs triton>=3.4 \(found 3.3.1\)"):
        load_as("3.3.1")
    load_as("3.4.0")
