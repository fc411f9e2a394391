"""Counter-based random numbers in plain torch: per-row seeds -> reproducible uniforms and derived seeds.

A row's noise is a pure function of (its seed, column), so it does not depend on the row's position in the
batch or on the other rows (unlike `torch.rand`, whose stream is shared by the whole call). All arithmetic
is int64 on values below 2**32 and every 32-bit multiply is split into 16-bit halves, so no intermediate
overflows and the results are identical on every device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x = (x * c) mod 2**32 in place, for x in [0, 2**32), without int64 overflow: c split into 16-bit halves."""
    hi = x * (c >> 16)
    hi &= 0xFFFF
    hi <<= 16
    x *= c & 0xFFFF
    x += hi
    x &= _MASK32
    return x


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place `mix32` (the [rows, V] noise pass is bound by memory traffic, so no temporaries beyond two)."""
    x ^= x >> 16
    _mul32_(x, 0x7FEB352D)
    x ^= x >> 15
    _mul32_(x, 0x846CA68B)
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" 32-bit integer hash (Wellons), on int64 tensors holding values in [0, 2**32)."""
    return _mix32_(x.clone())


def split_seed(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 seeds -> (low, high) 32-bit halves of their bit patterns (negative seeds are fine)."""
    return seeds & _MASK32, (seeds >> 32) & _MASK32


def row_keys(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit stream keys per row from int64 seeds [B] (both halves of the seed reach both keys)."""
    lo, hi = split_seed(seeds)
    k0 = mix32(lo ^ mix32(hi ^ 0x9E3779B9))
    k1 = mix32(k0 ^ 0x85EBCA6B)
    return k0, k1


def uniforms(seeds: torch.Tensor, num_cols: int, col0: int = 0) -> torch.Tensor:
    """fp32 [B, num_cols] in (0, 1) for columns col0.. of each row's stream; row r depends only on seeds[r].

    23 random bits at cell centres, so values are exactly representable and never 0 or 1.
    """
    k0, k1 = row_keys(seeds)
    cols = torch.arange(col0, col0 + num_cols, dtype=torch.int64, device=seeds.device)
    h = _mix32_(cols.unsqueeze(0) ^ k0.unsqueeze(1))  # mix32(mix32(col ^ k0) + k1): the csrc formula
    h += k1.unsqueeze(1)
    h &= _MASK32
    h = _mix32_(h)
    h >>= 9
    u = h.to(torch.float32)
    u += 0.5
    u *= 1.0 / 8388608.0
    return u


def derive_seeds(seeds: torch.Tensor, value: int | torch.Tensor) -> torch.Tensor:
    """int64 seeds [B] mixed with an integer counter (an int, or a [B] tensor): a new, well-spread 63-bit seed.

    Chaining it (seed -> sample index -> decode step) gives every (prompt, sample, step) its own stream.
    """
    lo, hi = split_seed(seeds)
    v = torch.as_tensor(value, dtype=torch.int64, device=seeds.device)
    v_lo, v_hi = split_seed(v)
    a = mix32(lo ^ mix32(v_lo ^ 0x27D4EB2F))
    b = mix32(hi ^ mix32(v_hi ^ 0x165667B1) ^ a)
    a = mix32(a ^ b)
    return ((b & 0x7FFFFFFF) << 32) | a
