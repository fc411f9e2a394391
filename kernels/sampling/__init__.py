"""Per-row-temperature token sampling: `sample_tokens`, with backend dispatch and argument validation.

Backends (all draw from the same processed distribution; see `naive.py` for the exact tie rules):
- ``reference``: sort + `torch.multinomial` in float64 (slow, obviously correct).
- ``torch``: vectorised torch, Gumbel-max, `torch.topk` selection instead of a full sort.
- ``triton``: one program per row, single online-softmax + Gumbel-max pass over the vocabulary, bisection
  selection for top-k/top-p thresholds (CUDA; runs on CPU under ``TRITON_INTERPRET=1``).
- ``csrc``: the C++ op ``torch.ops.erpo_fast.sample_tokens`` (CPU impl, and a CUDA impl where it was built).
- ``auto``: ``triton`` for CUDA tensors; on CPU ``csrc`` when the extension builds (checked once per
  process, one warning if the compiler fails), else ``torch``.
"""

from __future__ import annotations

import torch

from erpo_fast.errors import NonFiniteLogitsError

from .counter_rng import derive_seeds
from .naive import kept_mask_reference, processed_logprobs_reference, sample_tokens_reference

__all__ = ["NonFiniteLogitsError", "sample_tokens", "derive_seeds", "processed_logprobs_reference",
           "kept_mask_reference", "sample_tokens_reference"]


BACKENDS = ("auto", "reference", "torch", "triton", "csrc")


def _per_row(value, B: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.dim() != 1 or value.shape[0] != B:
            raise ValueError(f"{name} must be a scalar or a 1-D tensor of shape [{B}], "
                             f"got {tuple(value.shape)}")
        if value.is_floating_point() and dtype == torch.int64 and not torch.equal(value, value.round()):
            raise ValueError(f"{name} must hold integers")
        return value.to(device=device, dtype=dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be None, a number or a tensor, got {type(value).__name__}")
    return torch.full((B,), value, dtype=dtype, device=device)


def normalize_args(logits: torch.Tensor, temperature, top_k, top_p):
    """Validate and expand: (logits, temperature fp32 [B], top_k int64 [B], top_p fp32 [B]).

    Disabled filters become top_k = 0 and top_p = 1.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [B, V], got {getattr(logits, 'shape', type(logits))}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocabulary (V == 0)")
    dev = logits.device
    temperature = _per_row(temperature, B, torch.float32, dev, "temperature")
    top_k = _per_row(0 if top_k is None else top_k, B, torch.int64, dev, "top_k")
    top_p = _per_row(1.0 if top_p is None else top_p, B, torch.float32, dev, "top_p")
    # One device sync for both checks (NaN fails the comparisons, so it is caught too).
    bad_t, bad_p = torch.stack([~((temperature >= 0) & torch.isfinite(temperature)).any(),
                                ~((top_p > 0) & (top_p <= 1)).any()]).tolist()
    if bad_t:
        raise ValueError("temperature must be finite and >= 0 (0 means greedy)")
    if bad_p:
        raise ValueError("top_p must be in (0, 1]")
    return logits.contiguous(), temperature, top_k, top_p


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """A 63-bit seed for the counter-based RNGs: `seed`, else drawn from `generator` (or torch's global)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        return seed & ((1 << 63) - 1)
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())


def _row_seeds(seed: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    """Validated per-row seeds: int64 [B] on the logits' device."""
    if seed.dim() != 1 or seed.shape[0] != B:
        raise ValueError(f"seed as a tensor must have shape [{B}] (one per row), got {tuple(seed.shape)}")
    if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
        raise ValueError(f"seed as a tensor must hold integers, got {seed.dtype}")
    return seed.to(device=device, dtype=torch.int64).contiguous()


def _pick_backend(logits: torch.Tensor) -> str:
    if logits.is_cuda:
        return "triton"
    from erpo_fast.csrc import ops_available

    return "csrc" if ops_available() else "torch"


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor | float, *, top_k=None, top_p=None,
                  generator: torch.Generator | None = None, seed: int | torch.Tensor | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` [B, V] at that row's temperature.

    temperature: float or [B] tensor, >= 0; 0 means greedy (argmax, log-prob exactly 0). Rows may mix.
    top_k: None, int or [B] int tensor; <= 0 or >= V disables it for that row. Keeps logits >= the k-th
      largest (all tokens tied with the k-th value are kept).
    top_p: None, float or [B] tensor in (0, 1]; 1 disables it. Applied after temperature and top-k.
    generator / seed (at most one): same seed + same backend (+ same machine) -> same tokens. With
      neither, noise comes from torch's global generator, so `torch.manual_seed` applies. `triton` and
      `csrc` key their noise by (seed, row index, column), so a row's token does not depend on the other
      rows. Backends use different RNGs: the same seed gives different (equally valid) tokens across them.
    seed may also be an integer [B] tensor, one seed per row (every backend): row r's noise then
      depends only on seed[r], not on its position or the other rows, so permuting rows permutes the tokens
      and a row sampled alone gets the same token (`derive_seeds` makes per-step seeds from a base seed).
    Returns (tokens int64 [B], logprobs fp32 [B]): the log-prob of each sampled token under the processed
    (temperature-scaled, top-k/top-p-filtered, renormalised) distribution.
    Raises ValueError for bad arguments, and for rows whose logits hold NaN or +inf or no finite value.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed and generator")
    logits, temperature, top_k, top_p = normalize_args(logits, temperature, top_k, top_p)
    if logits.shape[0] == 0:
        empty = logits.new_empty(0)
        return empty.long(), empty.float()
    if backend == "auto":
        backend = _pick_backend(logits)
    row_seeds = None
    if isinstance(seed, torch.Tensor):
        row_seeds = _row_seeds(seed, logits.shape[0], logits.device)
        if backend == "reference":  # one generator per row (slow, obviously right)
            # Hashed first: torch's Mersenne Twister seeded with consecutive integers gives correlated first draws.
            mixed = derive_seeds(row_seeds, 0).tolist()
            rows = [sample_tokens_reference(logits[r:r + 1], temperature[r:r + 1], top_k[r:r + 1], top_p[r:r + 1],
                                            torch.Generator(logits.device).manual_seed(s))
                    for r, s in enumerate(mixed)]
            return torch.cat([t for t, _ in rows]), torch.cat([lp for _, lp in rows])
    elif backend in ("reference", "torch") and seed is not None:
        generator = torch.Generator(logits.device).manual_seed(_resolve_seed(seed, None))
    if backend == "reference":
        return sample_tokens_reference(logits, temperature, top_k, top_p, generator)
    if backend == "torch":
        from .torch_sampler import sample_tokens_torch

        tokens, logprobs = sample_tokens_torch(logits, temperature, top_k, top_p, generator, row_seeds)
    elif backend == "triton":
        from .triton_kernels import sample_tokens_triton

        tokens, logprobs = sample_tokens_triton(logits, temperature, top_k, top_p,
                                                _resolve_seed(seed, generator) if row_seeds is None else row_seeds)
    else:
        from erpo_fast.csrc import load_ops

        load_ops()
        if row_seeds is None:
            tokens, logprobs = torch.ops.erpo_fast.sample_tokens(logits, temperature, top_k, top_p,
                                                                 _resolve_seed(seed, generator))
        else:
            tokens, logprobs = torch.ops.erpo_fast.sample_tokens_rowseed(logits, temperature, top_k, top_p,
                                                                         row_seeds)
    # The fast backends flag invalid rows (NaN/+inf logits, or no finite logit) with a NaN log-prob; one
    # B-element check here instead of an extra pass over the logits.
    bad = ~torch.isfinite(logprobs)
    if bool(bad.any()):
        raise NonFiniteLogitsError(f"logits rows {bad.nonzero().flatten().tolist()} contain NaN or +inf, or "
                                   "have no finite logit")
    return tokens, logprobs

