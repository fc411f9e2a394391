"""Triton backend (the CUDA default; runs on CPU under ``TRITON_INTERPRET=1`` for the tests).

Design (three matmuls per training step, bounded memory), per chunk of rows:

1. ``_logits_stats_kernel``: a tiled matmul (``tl.dot`` over ``BLOCK_K`` slices of the hidden size, fp32
   accumulator) whose epilogue scales each ``[BLOCK_M, BLOCK_N]`` logits tile by the row's ``log2(e) / T``
   (loaded from a pointer: temperature is runtime data, never a constexpr, so a new value cannot trigger a
   recompile), optionally stores the tile into the chunk's fp32 ``[rows, V]`` buffer, and folds it into
   online-softmax statistics (running max, sum of exponentials, sum of exponential * logit, label logit).
   The grid is (row blocks, vocabulary splits): each program sweeps its split's tiles sequentially and writes
   partial statistics, which a few ``[splits, rows]`` torch ops combine into the log-sum-exp, label log-prob
   and entropy. Splitting the vocabulary gives the GPU enough programs even for a small row chunk.
2. ``dL/dlogp`` for the chunk's rows is computed in torch (N_chunk-sized, from the loss's elementwise
   definition).
3. ``_grad_logits_kernel``: one elementwise pass over the buffer turns logits into
   ``grad_logits = dL/dlogp / T * (onehot - p)`` (plus the entropy term when the entropy has a gradient), in
   place for fp32 inputs, or into a bf16/fp16 buffer for low-precision inputs.
4. ``grad_h = grad_logits @ W`` and ``grad_W += grad_logits^T @ h`` with cuBLAS (torch matmuls, fp32
   accumulation for ``grad_W``).

The alternative of recomputing the logits tile by tile in a second sweep (no ``[rows, V]`` buffer) costs a
4th matmul; it is what ``logprobs_backward`` does, because ``linear_logprobs``'s forward keeps only the
log-sum-exp. The fused loss keeps the buffer (bounded by ``ROW_CHUNK_BYTES``), as Liger's fused linear
cross-entropy does.

Everything is base 2 (``exp2``/``log2``, the native GPU instructions): the kernels see ``z * log2(e)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Bytes of the fused loss path's [rows, V] buffers (fp32 logits, plus the bf16/fp16 gradient for low-precision
# inputs). None: sized by device (`chunk_bytes`); tests set a small value to force many chunks.
ROW_CHUNK_BYTES: int | None = None
CPU_CHUNK_BYTES = 1 << 30
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the matmul kernel.
# Small blocks under the interpreter keep the CPU tests fast and still exercise ragged edges.
# fp32 operands halve BLOCK_K so three pipeline stages still fit in shared memory (~96 KB either way).
MATMUL_BLOCKS = (16, 32, 16, 4, 1) if INTERPRETING else (128, 128, 64, 8, 3)
MATMUL_BLOCKS_FP32 = (16, 32, 16, 4, 1) if INTERPRETING else (128, 128, 32, 8, 3)
GRAD_BLOCKS = (16, 128) if INTERPRETING else (4, 1024)  # (BLOCK_R, BLOCK_V) of the elementwise kernel
PROGRAMS_PER_SM = 4


# Launch-shape integers are not specialised: Triton would otherwise compile a variant per (== 1, % 16 == 0,
# other) class of each, and every new remainder chunk or split count could cost a compile mid-run.
@triton.jit(do_not_specialize=["n_rows", "v_per_split", "n_splits"])
def _logits_stats_kernel(
    h_ptr, w_ptr, inv_t2_ptr, labels_ptr, z_ptr, part_ptr,
    n_rows, vocab, hidden, stride_h, stride_w, stride_z, v_per_split, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STORE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    inv_t2 = tl.load(inv_t2_ptr + rows, mask=row_ok, other=1.0)  # log2(e) / T, one per row, runtime data
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    lab_i = tl.zeros([BLOCK_M], tl.float32)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, vocab)
    ks = tl.arange(0, BLOCK_K)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + ks
            k_ok = k < hidden
            a = tl.load(h_ptr + rows64[:, None] * stride_h + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols64[None, :] * stride_w + k[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST_DOT:  # interpreter only: its tl.dot multiplies bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        z = acc * inv_t2[:, None]
        if STORE_Z:
            tl.store(z_ptr + rows64[:, None] * stride_z + cols64[None, :], z,
                     mask=row_ok[:, None] & col_ok[None, :])
        z_valid = tl.where(col_ok[None, :], z, 0.0)
        m_new = tl.maximum(m_i, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp2(m_i - m_new)
        e = tl.where(col_ok[None, :], tl.exp2(z_valid - m_new[:, None]), 0.0)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        t_i = t_i * alpha + tl.sum(e * z_valid, axis=1)
        lab_i += tl.sum(tl.where(cols[None, :] == label[:, None], z_valid, 0.0), axis=1)
        m_i = m_new
    plane = n_splits * n_rows
    out = part_ptr + pid_s * n_rows + rows
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + plane, s_i, mask=row_ok)
    tl.store(out + 2 * plane, t_i, mask=row_ok)
    tl.store(out + 3 * plane, lab_i, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
def _grad_logits_kernel(
    z_ptr, g_ptr, lse2_ptr, coef_ptr, labels_ptr, ent_coef_ptr, entropy_ptr,
    n_rows, vocab, stride_z, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):
    """g = coef * (onehot - p) [- ent_coef * p * (ln p + H)] on a [BLOCK_R, BLOCK_V] block; g may alias z."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < vocab)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    log2p = z - lse2[:, None]
    p = tl.exp2(log2p)
    g = tl.where(cols[None, :] == label[:, None], coef[:, None], 0.0) - coef[:, None] * p
    if HAS_ENTROPY_GRAD:
        ent_coef = tl.load(ent_coef_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        g -= ent_coef[:, None] * p * (log2p * 0.6931471805599453 + entropy[:, None])
    tl.store(g_ptr + rows64[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------

def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the partial-statistics combine is exercised


def tf32_matmul_enabled() -> bool:
    """Whether torch's fp32 matmuls may use TF32, read through the API that cannot raise.

    torch >= 2.9 has ``fp32_precision`` ("ieee" / "tf32", or "none": inherit ``torch.backends.fp32_precision``).
    Reading the legacy ``allow_tf32`` after anyone set the new flag (vLLM's worker does, in this process) raises
    a RuntimeError about mixing the two APIs, so the new flag is read first; setting the legacy flag updates it.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def split_plan(row_blocks: int, vocab: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """(v_per_split, n_splits) of the vocabulary so that row_blocks * n_splits programs fill at most
    PROGRAMS_PER_SM waves: rounding the split count down, never up, so no last wave runs nearly empty
    (at V = 151,936 and 14 row blocks on 132 SMs, rounding up gave 532 programs: 4.03 waves, so 5)."""
    want = max(1, (PROGRAMS_PER_SM * num_sms) // row_blocks)
    v_per_split = triton.cdiv(triton.cdiv(vocab, want), block_n) * block_n
    return v_per_split, triton.cdiv(vocab, v_per_split)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: follow torch's matmul setting (full fp32 by default), as a torch fp32 matmul would.
    if dtype == torch.float32 and not tf32_matmul_enabled():
        return "ieee"
    return "tf32"


def _logits_stats(h: Tensor, weight: Tensor, inv_t2: Tensor, labels: Tensor, z: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(base-2 lse, natural label log-prob (0 where ignored), natural entropy) for the rows of ``h``;
    also fills ``z`` [rows, V] with the base-2 logits when given."""
    n_rows, hidden = h.shape
    vocab = weight.shape[0]
    block_m, block_n, block_k, num_warps, num_stages = MATMUL_BLOCKS_FP32 if h.dtype == torch.float32 else MATMUL_BLOCKS
    row_blocks = triton.cdiv(n_rows, block_m)
    v_per_split, n_splits = split_plan(row_blocks, vocab, block_n, _num_sms(h.device))
    part = torch.empty((4, n_splits, n_rows), dtype=torch.float32, device=h.device)
    _logits_stats_kernel[(row_blocks, n_splits)](
        h, weight, inv_t2, labels, z if z is not None else part, part,
        n_rows, vocab, hidden, h.stride(0), weight.stride(0), z.stride(0) if z is not None else 0,
        v_per_split, n_splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STORE_Z=z is not None,
        DOT_PRECISION=_dot_precision(h.dtype), UPCAST_DOT=INTERPRETING and h.dtype != torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    m, s, t, lab = part.unbind(0)
    m_all = m.amax(dim=0)
    scale = torch.exp2(m - m_all)
    s_all = (s * scale).sum(dim=0)
    t_all = (t * scale).sum(dim=0)
    lse2 = m_all + torch.log2(s_all)
    logp = torch.where(labels < 0, 0.0, (lab.sum(dim=0) - lse2) * LN2)
    return lse2, logp, (lse2 - t_all / s_all) * LN2


def _grad_logits(z: Tensor, g: Tensor, lse2: Tensor, coef: Tensor, labels: Tensor,
                 ent_coef: Tensor | None, entropy: Tensor | None) -> None:
    rows, vocab = z.shape
    has_ent = ent_coef is not None
    block_r, block_v = GRAD_BLOCKS
    _grad_logits_kernel[(triton.cdiv(vocab, block_v), triton.cdiv(rows, block_r))](
        z, g, lse2, coef, labels, ent_coef if has_ent else coef, entropy if has_ent else coef,
        rows, vocab, z.stride(0), g.stride(0), BLOCK_R=block_r, BLOCK_V=block_v, HAS_ENTROPY_GRAD=has_ent,
        num_warps=4,
    )


LOWP_ACC_MODES = ("addmm", "tiled_mm", "upcast")  # preferred first; the first this torch/device runs is kept
ACC_TILE = 16384  # weight rows per GEMM in the tiled modes (bounds their fp32 temporaries)
_ACC_MODE: dict[str, str] = {}  # device type -> mode, chosen once per process by `acc_mode`


def _mm_accumulate_mode(out: Tensor, a: Tensor, b: Tensor, first: bool, mode: str) -> None:
    if mode == "addmm":  # cuBLAS accumulates into the fp32 C matrix in place: no temporary at all
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return
    for v0 in range(0, out.shape[0], ACC_TILE):
        rows = slice(v0, v0 + ACC_TILE)
        part = (torch.mm(a[rows], b, out_dtype=torch.float32) if mode == "tiled_mm"
                else torch.mm(a[rows].float(), b.float()))
        if first:
            out[rows].copy_(part)
        else:
            out[rows].add_(part)


def acc_mode(device: torch.device) -> str:
    """The low-precision-in / fp32-accumulate mode for ``device``, probed once on a tiny matmul.

    The probe is the only place an error selects a mode: an error in a real call (an out-of-memory above all)
    propagates and never downgrades the mode for the rest of the process, as a try/except there used to.
    """
    key = device.type
    if key not in _ACC_MODE:
        a = torch.ones(32, 16, dtype=torch.bfloat16, device=device)
        b = torch.ones(16, 8, dtype=torch.bfloat16, device=device)
        out = torch.empty(32, 8, dtype=torch.float32, device=device)
        for mode in LOWP_ACC_MODES:
            try:  # NotImplementedError and "expected ... dtype" are RuntimeErrors; an old signature a TypeError
                _mm_accumulate_mode(out, a, b, True, mode)
                _mm_accumulate_mode(out, a, b, False, mode)
            except (RuntimeError, TypeError):
                continue
            if bool((out == 32.0).all()):
                _ACC_MODE[key] = mode
                break
        else:
            raise RuntimeError(f"no fp32-accumulating matmul works on {device} (tried {', '.join(LOWP_ACC_MODES)})")
    return _ACC_MODE[key]


def _mm_accumulate_(out: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``out (+)= a @ b`` with an fp32 ``out`` and fp32 accumulation, also for bf16/fp16 ``a``, ``b``."""
    if a.dtype == out.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
        return
    _mm_accumulate_mode(out, a, b, first, acc_mode(out.device))


def chunk_bytes(device: torch.device) -> int:
    """Byte budget of the [rows, V] buffers: ``ROW_CHUNK_BYTES`` when set, else by device.

    Every chunk reads and writes the fp32 grad-W once (2 x 2.2 GB at the 7B head), so fewer, larger chunks cut
    that traffic; the budget is 1/32 of the device's memory (2.5 GiB on an 80 GB card), within [1, 4] GiB,
    and never more than a quarter of what is free now.
    """
    if ROW_CHUNK_BYTES is not None:
        return ROW_CHUNK_BYTES
    if device.type != "cuda":
        return CPU_CHUNK_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1 << 30, min(total // 32, 4 << 30, free // 4)))


def _chunk_rows(vocab: int, n: int, budget: int, bytes_per_logit: int) -> int:
    rows = max(1, budget // (vocab * bytes_per_logit))
    block_m = MATMUL_BLOCKS[0]
    if rows >= block_m:
        rows -= rows % block_m  # keeps every chunk's row pointers 16-byte aligned
    return min(rows, max(n, 1))


def logprobs_forward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Label log-probs, entropies and base-2 log-sum-exps [N] (fp32), no logits stored."""
    inv_t2 = (inv_t * LOG2E).float().contiguous()
    lse2, logp, entropy = _logits_stats(hidden, weight, inv_t2, labels, None)
    return logp, entropy, lse2


def logprobs_backward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, lse: Tensor,
                      grad_logp: Tensor | None, grad_entropy: Tensor | None, entropy: Tensor,
                      need_hidden: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients w.r.t. hidden and weight from dL/dlogp and dL/dH; recomputes the logits chunk by chunk."""
    coef = torch.zeros_like(inv_t) if grad_logp is None else grad_logp.float() * inv_t
    coef = coef.masked_fill(labels < 0, 0.0).contiguous()
    ent_coef = None if grad_entropy is None else (grad_entropy.float() * inv_t).contiguous()
    return _gradient_pass(hidden, weight, labels, inv_t, need_hidden, need_weight,
                          lambda start, end, lse_c, logp_c: coef[start:end],
                          lse=lse, ent_coef=ent_coef, entropy=entropy)[2:]


def fused_forward_backward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor,
                           dlogp_fn: Callable[[int, int, Tensor], Tensor],
                           need_hidden: bool, need_weight: bool,
                           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Log-probs, entropies and the gradients of the loss whose dL/dlogp is ``dlogp_fn(start, end, logp)``."""
    def coef_fn(start, end, lse_c, logp_c):
        coef = dlogp_fn(start, end, logp_c).float() * inv_t[start:end]
        return coef.masked_fill(labels[start:end] < 0, 0.0).contiguous()

    return _gradient_pass(hidden, weight, labels, inv_t, need_hidden, need_weight, coef_fn)


def _gradient_pass(hidden, weight, labels, inv_t, need_hidden, need_weight, coef_fn, *, lse=None,
                   ent_coef=None, entropy=None):
    """Per row chunk: logits (+ statistics unless ``lse`` is given) into the buffer, grad_logits, 2 matmuls.

    Returns (logp, entropy, grad_hidden, grad_weight); logp/entropy are None when ``lse`` was given.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    device, low_precision = hidden.device, hidden.dtype != torch.float32
    inv_t2 = (inv_t * LOG2E).float().contiguous()
    logp_all = None if lse is not None else torch.empty(n, dtype=torch.float32, device=device)
    ent_all = None if lse is not None else torch.empty(n, dtype=torch.float32, device=device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    rows = _chunk_rows(vocab, n, chunk_bytes(device), 4 + (hidden.element_size() if low_precision else 0))
    buf = torch.empty(rows * vocab, dtype=torch.float32, device=device)
    gbuf = torch.empty(rows * vocab, dtype=hidden.dtype, device=device) if low_precision else buf
    z = g = None
    for start in range(0, n, rows):
        end = min(start + rows, n)
        r = end - start
        h, lab = hidden[start:end], labels[start:end]
        z = buf[: r * vocab].view(r, vocab)
        g = gbuf[: r * vocab].view(r, vocab)
        stats = _logits_stats(h, weight, inv_t2[start:end], lab, z)
        if lse is None:
            lse_c, logp_all[start:end], ent_all[start:end] = stats
            logp_c = logp_all[start:end]
        else:
            lse_c, logp_c = lse[start:end], None
        coef = coef_fn(start, end, lse_c, logp_c)
        _grad_logits(z, g, lse_c.contiguous(), coef, lab,
                     None if ent_coef is None else ent_coef[start:end],
                     None if entropy is None else entropy[start:end].float().contiguous())
        if grad_h is not None:
            if low_precision and device.type != "cuda":
                grad_h[start:end] = (g.float() @ weight.float()).to(hidden.dtype)
            else:  # one GEMM over the full vocabulary: a single rounding to the output dtype
                torch.mm(g, weight, out=grad_h[start:end])
        if grad_w is not None:
            _mm_accumulate_(grad_w, g.T, h, first=start == 0)
    if n == 0 and grad_w is not None:
        grad_w.zero_()
    del buf, gbuf, z, g  # free the chunk buffers before the grad-W cast below allocates its output
    return logp_all, ent_all, grad_h, None if grad_w is None else grad_w.to(weight.dtype)
