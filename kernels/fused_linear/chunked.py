"""Torch backend: chunked over rows, memory-bounded, three matmuls per training step. The CPU default.

The full ``[N, V]`` logits never exist. Rows are processed in chunks whose ``[rows, V]`` logits fit in
``ROW_CHUNK_BYTES`` (about 300 rows for a 152k vocabulary at the default 192 MB) and are at most
``MAX_CHUNK_ROWS`` (256) long; all large temporaries are preallocated once and reused.

Why a whole ``[rows, V]`` chunk and not only a ``[rows, vocab_tile]`` tile: ``grad_logits = dL/dlogp *
(onehot - softmax)`` needs the row's final log-sum-exp, which is known only after the whole vocabulary has been
seen. Keeping only a tile would force recomputing the logits in a second pass: a 4th matmul. Keeping the chunk
keeps the step at three matmuls (``z = h W^T``, ``grad_h = g W``, ``grad_W += g^T h``), the design Liger's fused
linear cross-entropy uses. The elementwise statistics then sweep the resident chunk in ``VOCAB_TILE``-column
tiles through one small scratch tile, so no second chunk-sized temporary appears.

Entry points, shared with the Triton backend (`triton_kernels.py` has the same signatures):

- ``logprobs_forward``: log-probs, entropies and log-sum-exps (no grad). One matmul.
- ``logprobs_backward``: given the saved log-sum-exps, recompute the chunk's logits, turn them into
  ``grad_logits`` in place, and do the two gradient matmuls. Recomputing is the 4th matmul of a
  ``linear_logprobs`` forward+backward, which is fine there (it is not the training loss).
- ``fused_forward_backward``: the GRPO loss path: statistics, then ``dL/dlogp`` for the chunk from a caller
  callback (an N_chunk-sized autograd call), then ``grad_logits`` in place and the gradient matmuls, all in the
  forward pass.

Math: with ``z = h W^T / T`` (per-row T), ``lse = logsumexp(z)``, ``p = exp(z - lse)``,
``logp_y = z_y - lse``, ``H = lse - sum(p z)``; ``d logp_y / d z = onehot_y - p``,
``d H / d z = -p (log p + H)``, and ``d z / d(h W^T) = 1 / T``. The code works in base 2 (the chunk holds
``z * log2(e)``; ``lse`` is a base-2 log-sum-exp) because ``torch.exp2`` is several times faster than
``torch.exp`` on CPU; exponents are floored at ``EXP2_FLOOR`` so underflow never produces slow denormals (an
error of at most V * 2**-100 relative to a sum that is >= 1).

Precision: bf16/fp16 weights are upcast to fp32 one ``VOCAB_TILE`` at a time before each matmul (CPU has no
low-precision-in / fp32-out GEMM; a product of two bf16 numbers is exact in fp32, so this equals a bf16 GEMM
with fp32 accumulation). Everything after the matmul is fp32. float64 inputs run in float64 (for tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

ROW_CHUNK_BYTES = 192 << 20  # one row chunk's [rows, V] logits in the compute dtype
# ... and at most this many rows: on one CPU core 256-row chunks ran as fast as or faster than the byte-sized ones
# at SmolLM2-135M's and Qwen2.5-0.5B's heads (0.70 vs 0.78 s at 512 rows, 3.25 vs 3.28 s at 331, per 512-row
# forward + backward; bench/results/linear_loss_chunk_rows-cpu.json), so a larger chunk only costs memory.
MAX_CHUNK_ROWS = 256
VOCAB_TILE = 8192  # columns per elementwise tile (and per upcast weight tile for bf16/fp16)
EXP2_FLOOR = -100.0
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: as many as fit ``ROW_CHUNK_BYTES`` of [rows, V] logits, at most ``MAX_CHUNK_ROWS`` (at
    least one)."""
    itemsize = torch.empty((), dtype=_compute_dtype(dtype)).element_size()
    return max(1, min(MAX_CHUNK_ROWS, ROW_CHUNK_BYTES // (vocab * itemsize)))


def _tiles(v: int) -> Iterator[tuple[int, int]]:
    for v0 in range(0, v, VOCAB_TILE):
        yield v0, min(v0 + VOCAB_TILE, v)


class _Workspace:
    """The preallocated chunk buffer and scratch tile, reused by every row chunk."""

    def __init__(self, n: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.vocab = vocab
        self.rows = min(chunk_rows(vocab, dtype), max(n, 1))
        self.cdt = _compute_dtype(dtype)
        self.buf = torch.empty(self.rows * vocab, dtype=self.cdt, device=device)
        self.scratch = torch.empty(self.rows * min(VOCAB_TILE, vocab), dtype=self.cdt, device=device)

    def chunks(self, n: int) -> Iterator[tuple[int, int, Tensor]]:
        """(start, end, z) with ``z`` the [end - start, V] view of the buffer for that chunk."""
        for start in range(0, n, self.rows):
            end = min(start + self.rows, n)
            yield start, end, self.buf[: (end - start) * self.vocab].view(end - start, self.vocab)

    def scratch_like(self, rows: int, cols: int) -> Tensor:
        return self.scratch[: rows * cols].view(rows, cols)


def _weight_tiles(weight: Tensor, cdt: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """(v0, v1, weight rows v0..v1 in the compute dtype): one tile if no upcast is needed, else VOCAB_TILE ones."""
    if weight.dtype == cdt:
        yield 0, weight.shape[0], weight
        return
    for v0, v1 in _tiles(weight.shape[0]):
        yield v0, v1, weight[v0:v1].to(cdt)


def _chunk_logits_(z: Tensor, h: Tensor, weight: Tensor, inv_t2: Tensor, ws: _Workspace) -> Tensor:
    """Fill ``z`` [r, V] with the chunk's base-2 logits ``h W^T * log2(e) / T``."""
    for v0, v1, w in _weight_tiles(weight, ws.cdt):
        if v1 - v0 == z.shape[1]:
            torch.mm(h, w.T, out=z)
        else:  # mm's out= must be contiguous; a column slice of z is not
            z[:, v0:v1].copy_(torch.mm(h, w.T, out=ws.scratch_like(z.shape[0], v1 - v0)))
    return z.mul_(inv_t2[:, None])


def _chunk_stats(z: Tensor, labels: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """(base-2 lse, natural log-prob of the label (0 where ignored), natural entropy) of the chunk's rows."""
    m = z.amax(dim=1)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)  # sum 2**(z - m) * z
    for v0, v1 in _tiles(z.shape[1]):
        zt = z[:, v0:v1]
        e = torch.sub(zt, m[:, None], out=ws.scratch_like(z.shape[0], v1 - v0)).clamp_min_(EXP2_FLOOR).exp2_()
        s += e.sum(dim=1)
        t += e.mul_(zt).sum(dim=1)
    lse = m + torch.log2(s)
    label_logit = z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    logp = torch.where(labels < 0, 0.0, (label_logit - lse) * LN2)
    return lse, logp, (lse - t / s) * LN2


def _chunk_grad_logits_(z: Tensor, lse: Tensor, coef: Tensor, labels: Tensor, ent_coef: Tensor | None,
                        entropy: Tensor | None, ws: _Workspace) -> Tensor:
    """Overwrite the base-2 logits ``z`` with dL/d(h W^T) and return it.

    ``coef = dL/dlogp / T`` and ``ent_coef = dL/dH / T`` per row (``coef`` is 0 on ignored rows). Without the
    entropy term: ``g = coef * (onehot - p)``; with it, ``g -= ent_coef * p * (log p + H)``.
    """
    z.sub_(lse[:, None]).clamp_min_(EXP2_FLOOR)  # log2 p
    if ent_coef is None:
        z.exp2_().mul_(-coef[:, None])
    else:
        for v0, v1 in _tiles(z.shape[1]):
            zt = z[:, v0:v1]
            p = torch.exp2(zt, out=ws.scratch_like(z.shape[0], v1 - v0))
            zt.mul_(LN2).add_(entropy[:, None]).mul_(ent_coef[:, None]).add_(coef[:, None]).mul_(p).neg_()
    # ignored rows have coef 0, so pointing them at column 0 adds nothing
    return z.scatter_add_(1, labels.clamp(min=0)[:, None], coef[:, None])


def _chunk_grad_matmuls(g: Tensor, h: Tensor, weight: Tensor, grad_h: Tensor | None, grad_w: Tensor | None,
                        first_chunk: bool, ws: _Workspace) -> None:
    """grad_h (this chunk's rows) = g W; grad_w (+)= g^T h. The first write uses mm(out=), not zeros + add."""
    for i, (v0, v1, w) in enumerate(_weight_tiles(weight, ws.cdt)):
        gt = g[:, v0:v1]
        if grad_h is not None:
            if i == 0:
                torch.mm(gt, w, out=grad_h)
            else:
                grad_h.addmm_(gt, w)
        if grad_w is not None:
            if first_chunk:
                torch.mm(gt.T, h, out=grad_w[v0:v1])
            else:
                grad_w[v0:v1].addmm_(gt.T, h)


def logprobs_forward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Label log-probs, entropies and base-2 log-sum-exps [N] in the compute dtype (no grad)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    ws = _Workspace(n, vocab, hidden.dtype, hidden.device)
    inv_t2 = inv_t * LOG2E
    logp, entropy, lse = (torch.empty(n, dtype=ws.cdt, device=hidden.device) for _ in range(3))
    for start, end, z in ws.chunks(n):
        _chunk_logits_(z, hidden[start:end].to(ws.cdt), weight, inv_t2[start:end], ws)
        lse[start:end], logp[start:end], entropy[start:end] = _chunk_stats(z, labels[start:end], ws)
    return logp, entropy, lse


def logprobs_backward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, lse: Tensor,
                      grad_logp: Tensor | None, grad_entropy: Tensor | None, entropy: Tensor,
                      need_hidden: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients w.r.t. hidden and weight (input dtypes) from dL/dlogp and dL/dH, recomputing the logits."""
    n, vocab = hidden.shape[0], weight.shape[0]
    ws = _Workspace(n, vocab, hidden.dtype, hidden.device)
    inv_t2 = inv_t * LOG2E
    coef = torch.zeros_like(inv_t) if grad_logp is None else grad_logp.to(ws.cdt) * inv_t
    coef.masked_fill_(labels < 0, 0.0)  # ignored labels: their log-prob is the constant 0
    ent_coef = None if grad_entropy is None else grad_entropy.to(ws.cdt) * inv_t
    grad_h = torch.empty(hidden.shape, dtype=ws.cdt, device=hidden.device) if need_hidden else None
    grad_w = torch.empty(weight.shape, dtype=ws.cdt, device=hidden.device) if need_weight else None
    for start, end, z in ws.chunks(n):
        h = hidden[start:end].to(ws.cdt)
        _chunk_logits_(z, h, weight, inv_t2[start:end], ws)
        g = _chunk_grad_logits_(z, lse[start:end], coef[start:end], labels[start:end],
                                None if ent_coef is None else ent_coef[start:end], entropy[start:end], ws)
        _chunk_grad_matmuls(g, h, weight, None if grad_h is None else grad_h[start:end], grad_w, start == 0, ws)
    if n == 0 and grad_w is not None:
        grad_w.zero_()
    return _cast(grad_h, hidden.dtype), _cast(grad_w, weight.dtype)


def fused_forward_backward(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor,
                           dlogp_fn: Callable[[int, int, Tensor], Tensor],
                           need_hidden: bool, need_weight: bool,
                           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Log-probs, entropies, and the gradients of a loss whose dL/dlogp for rows [start, end) is
    ``dlogp_fn(start, end, logp_chunk)``, all in one pass over the rows (three matmuls in total)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    ws = _Workspace(n, vocab, hidden.dtype, hidden.device)
    inv_t2 = inv_t * LOG2E
    logp, entropy = (torch.empty(n, dtype=ws.cdt, device=hidden.device) for _ in range(2))
    grad_h = torch.empty(hidden.shape, dtype=ws.cdt, device=hidden.device) if need_hidden else None
    grad_w = torch.empty(weight.shape, dtype=ws.cdt, device=hidden.device) if need_weight else None
    for start, end, z in ws.chunks(n):
        h = hidden[start:end].to(ws.cdt)
        lab = labels[start:end]
        _chunk_logits_(z, h, weight, inv_t2[start:end], ws)
        lse, logp[start:end], entropy[start:end] = _chunk_stats(z, lab, ws)
        coef = dlogp_fn(start, end, logp[start:end]).to(ws.cdt) * inv_t[start:end]
        coef.masked_fill_(lab < 0, 0.0)
        g = _chunk_grad_logits_(z, lse, coef, lab, None, None, ws)
        _chunk_grad_matmuls(g, h, weight, None if grad_h is None else grad_h[start:end], grad_w, start == 0, ws)
    if n == 0 and grad_w is not None:
        grad_w.zero_()
    return logp, entropy, _cast(grad_h, hidden.dtype), _cast(grad_w, weight.dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
