"""Triton sampler: a selection kernel for the top-k/top-p thresholds, then a single-pass Gumbel-max kernel.

Both kernels give each program ROWS rows (ROWS = 1 on GPU: one program per row) and loop over the
vocabulary in BLOCK-wide tiles; temperature, top_k and top_p are loaded per row from tensors (never
constexpr), so new values never recompile. The CPU interpreter (TRITON_INTERPRET=1) runs programs one after
another at a fixed cost per operation, so there the wrapper packs many rows into each program instead.

1. `_threshold_kernel`: the per-row logit threshold (keep logit >= thr), by bisection over the
   order-preserving int32 key of the fp32 logits: 32 exact counting passes give the k-th largest logit; then
   32 mass passes give the smallest logit whose strictly-larger mass (under the top-k-renormalised
   distribution) is < top_p. Blocks without filtered rows skip both and store -inf. Bisection keeps the
   kernel sort-free and exact.
2. `_sample_kernel`: one pass with an online max/logsumexp over kept tokens and a running Gumbel argmax
   (Philox noise from `tl.randint`, keyed by (seed, row * V + column), or with per-row seeds by
   (seeds[row], column)); log-prob = s_tok - logsumexp.
   Temperature-0 rows take the first argmax with log-prob 0. Rows with NaN/+inf logits (or no finite kept
   logit) get a NaN log-prob, which the Python front end turns into a ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The Gumbel noise takes 23 bits of a 32-bit tl.randint draw. With int64 offsets, Triton before 3.4 ran 64-bit
# Philox and returned 64-bit values (triton-lang/triton#6832), which would make the noise silently wrong.
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):
    raise ImportError(f"erpo_fast's Triton sampler needs triton>=3.4 (found {triton.__version__})")

INT32_MIN: tl.constexpr = tl.constexpr(-(2**31))


@triton.jit
def _float_key(x):
    """Order-preserving int32 key of fp32 values; -0.0 is folded to +0.0 first so equal floats share a key."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _threshold_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, thr_ptr, B, V,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride
    t = tl.load(temp_ptr + rows, mask=row_ok, other=0.0)
    k = tl.load(topk_ptr + rows, mask=row_ok, other=0)
    p = tl.load(topp_ptr + rows, mask=row_ok, other=1.0)
    k_on = row_ok & (t > 0) & (k > 0) & (k < V)
    p_on = row_ok & (t > 0) & (p < 1.0)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    # kept iff key >= thr_key; the initial value keeps everything.
    thr_key = tl.full([ROWS], INT32_MIN, tl.int64)
    if tl.sum(k_on.to(tl.int32), 0) > 0:
        # Largest key t with count(key >= t) >= k is the key of the k-th largest logit.
        lo = tl.full([ROWS], INT32_MIN, tl.int64)  # always valid: every key is >= INT32_MIN
        hi = tl.full([ROWS], 2**31, tl.int64)  # never valid
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            count = tl.zeros([ROWS], tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = row_ok[:, None] & (cols < V)[None, :]
                x = tl.load(row_base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
                count += tl.sum(((_float_key(x) >= mid[:, None]) & mask).to(tl.int32), 1)
            ok = count >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        thr_key = tl.where(k_on, lo, thr_key)
    if tl.sum(p_on.to(tl.int32), 0) > 0:
        # logsumexp of the top-k-kept scaled logits (online over tiles).
        m = tl.full([ROWS], -float("inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(row_base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
            s = tl.where(mask & (_float_key(x) >= thr_key[:, None]), x * inv_t[:, None], -float("inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m = m_new
        m = tl.where(m == -float("inf"), 0.0, m)
        # Smallest key t with mass(key > t) < top_p * total; lo starts invalid (everything is above it).
        lo = thr_key - 1
        hi = tl.full([ROWS], 2**31 - 1, tl.int64)  # valid: nothing is above it
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros([ROWS], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = row_ok[:, None] & (cols < V)[None, :]
                x = tl.load(row_base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
                key = _float_key(x)
                above = mask & (key >= thr_key[:, None]) & (key > mid[:, None])
                s = tl.where(above, x * inv_t[:, None], -float("inf"))
                mass += tl.sum(tl.exp(s - m[:, None]), 1)
            ok = mass < p * total
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        thr_key = tl.where(p_on, hi, thr_key)
    bits = tl.where(thr_key >= 0, thr_key, thr_key ^ 0x7FFFFFFF).to(tl.int32)
    thr = tl.where(thr_key == INT32_MIN, -float("inf"), bits.to(tl.float32, bitcast=True))
    tl.store(thr_ptr + rows, thr, mask=row_ok)


@triton.jit
def _sample_kernel(logits_ptr, stride, temp_ptr, thr_ptr, tok_ptr, lp_ptr, seed, seeds_ptr, B, V,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, ROW_SEEDS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride
    t = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    greedy = t == 0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    thr = tl.where(greedy, -float("inf"), tl.load(thr_ptr + rows, mask=row_ok, other=0.0))
    m = tl.full([ROWS], -float("inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    best = tl.full([ROWS], -float("inf"), tl.float32)
    best_s = tl.zeros([ROWS], tl.float32)
    best_idx = tl.zeros([ROWS], tl.int32)
    bad = tl.zeros([ROWS], tl.int32)
    if ROW_SEEDS:  # per-row seeds: Philox keyed by the row's seed, counter = column (independent of the row index)
        row_seed = tl.load(seeds_ptr + rows, mask=row_ok, other=0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(row_base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 1)
        kept = mask & (x >= thr[:, None])
        s = tl.where(kept, x * inv_t[:, None], -float("inf"))
        # online logsumexp
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
        # running Gumbel argmax; u in (0, 1) from 23 random bits at cell centres
        if ROW_SEEDS:
            r = tl.randint(row_seed[:, None], cols[None, :].to(tl.int64) + tl.zeros([ROWS, 1], tl.int64))
        else:
            r = tl.randint(seed, rows.to(tl.int64)[:, None] * V + cols[None, :])
        u = ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        # E = -log(u) ~ Exp(1); near u = 1 a series in the exact w = 1 - u, since a fast log loses E there
        w = 1.0 - u
        e = tl.where(w < 0.0078125, w * (1.0 + w * (0.5 + w * (0.3333333333 + w * 0.25))), -tl.log(u))
        key = tl.where(kept, tl.where(greedy[:, None], s, s - tl.log(e)), -float("inf"))
        tile_best = tl.max(key, 1)
        tile_idx = tl.min(tl.where(key == tile_best[:, None], cols[None, :], 2147483647), 1)
        better = tile_best > best  # strict: the earliest tile wins ties
        tile_s = tl.sum(tl.where(cols[None, :] == tile_idx[:, None], s, 0.0), 1)
        best_s = tl.where(better, tile_s, best_s)
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    lp = tl.where(greedy, 0.0, best_s - (m + tl.log(tl.where(total > 0, total, 1.0))))
    lp = tl.where((bad > 0) | (m == -float("inf")), float("nan"), lp)
    tl.store(tok_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(lp_ptr + rows, lp, mask=row_ok)


def _launch_shape(logits: torch.Tensor, block: int | None, rows: int | None) -> tuple[int, int]:
    B, V = logits.shape
    if rows is None:
        rows = 1 if logits.is_cuda else min(512, triton.next_power_of_2(max(B, 1)))
    return rows, block or min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 256)


def kept_thresholds_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, block: int | None = None,
                           rows: int | None = None) -> torch.Tensor:
    """fp32 [B] logit thresholds (keep logit >= thr; -inf: no filter), from the selection kernel."""
    B, V = logits.shape
    thr = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        ROWS, BLOCK = _launch_shape(logits, block, rows)
        _threshold_kernel[(triton.cdiv(B, ROWS),)](logits, logits.stride(0), temperature, top_k, top_p, thr,
                                                  B, V, ROWS=ROWS, BLOCK=BLOCK)
    return thr


def sample_with_thresholds_triton(logits: torch.Tensor, temperature: torch.Tensor, thr: torch.Tensor,
                                  seed: int | torch.Tensor, block: int | None = None, rows: int | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The single sampling pass over tokens with logit >= thr [B]: (tokens int64 [B], logprobs fp32 [B]).

    seed: an int (row r's noise keyed by (seed, r)) or an int64 [B] tensor (keyed by seed[r] alone).
    """
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        ROWS, BLOCK = _launch_shape(logits, block, rows)
        row_seeds = isinstance(seed, torch.Tensor)
        _sample_kernel[(triton.cdiv(B, ROWS),)](logits, logits.stride(0), temperature, thr, tokens, logprobs,
                                               0 if row_seeds else seed, seed if row_seeds else thr, B, V,
                                               ROWS=ROWS, BLOCK=BLOCK, ROW_SEEDS=row_seeds)
    return tokens, logprobs


def sample_tokens_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, seed: int | torch.Tensor, block: int | None = None,
                         rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [B], logprobs fp32 [B]); validated per-row tensors in, NaN log-prob marks invalid rows.

    The threshold kernel always runs (blocks without filtered rows exit at once), so there is no host sync.
    """
    thr = kept_thresholds_triton(logits, temperature, top_k, top_p, block, rows)
    return sample_with_thresholds_triton(logits, temperature, thr, seed, block, rows)
