"""Vectorised torch sampler: `torch.topk` selection for the top-k/top-p thresholds, then Gumbel-max.

Same distribution and tie rules as `naive.py`, without sorting the whole vocabulary in the common case:
- top-k: the k-th largest logit from `torch.topk` is the threshold (keep logits >= it).
- top-p: the threshold lies among the highest-probability tokens, so we sort only the top `candidates` logits
  (a `torch.topk`); a row whose candidates hold less than `top_p` of the mass falls back to a full sort.
- sampling: argmax(p / E) with p = softmax(s) over kept tokens and E ~ Exp(1) is a draw from p (the
  exponential race, i.e. Gumbel-max: log p - log E); the log-prob is log p_tok.
Rows are processed in chunks so the [rows, V] temporaries stay bounded.
"""

from __future__ import annotations

import torch

from .counter_rng import uniforms

# Candidates for the top-p threshold search: LM distributions put top_p of their mass in far fewer tokens.
TOP_P_CANDIDATES = 1024
# Elements per row chunk of the sampling pass (bounds each fp32 temporary to 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def _top_p_threshold(z: torch.Tensor, s: torch.Tensor, top_p: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of z (logits), s (scaled, -inf outside top-k): (threshold logit, resolved) from the top-k of z."""
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    values, idx = torch.topk(s, k, dim=1)  # sorted, descending; s is monotone in z so this is the top-k of z
    probs = (values - lse).exp()
    exclusive = torch.cumsum(probs, dim=1) - probs
    n_kept = (exclusive < top_p.unsqueeze(1)).sum(1, keepdim=True).clamp(1, k)
    resolved = (probs.sum(1) >= top_p) | (k == z.shape[1])
    return z.gather(1, idx.gather(1, n_kept - 1)).squeeze(1), resolved


def kept_thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """fp32 [B]: per-row logit threshold; a token is kept iff logit >= threshold (-inf: no filtering)."""
    B, V = logits.shape
    thr = torch.full((B,), -torch.inf, dtype=torch.float32, device=logits.device)
    sampled = temperature > 0
    k_on = sampled & (top_k > 0) & (top_k < V)
    p_on = sampled & (top_p < 1)
    if bool(k_on.any()):
        rows = k_on.nonzero().squeeze(1)
        k = top_k[rows]
        values = torch.topk(logits[rows].float(), int(k.max()), dim=1).values
        thr[rows] = values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    if bool(p_on.any()):
        rows = p_on.nonzero().squeeze(1)
        z = logits[rows].float()
        s = torch.where(z >= thr[rows].unsqueeze(1), z / temperature[rows].unsqueeze(1), -torch.inf)
        # With top-k on every such row, its k tokens are the candidates (ties beyond k fall back below).
        k_cap = int(torch.where(k_on[rows], top_k[rows], V).max())
        tau, resolved = _top_p_threshold(z, s, top_p[rows], min(V, TOP_P_CANDIDATES, k_cap))
        if not bool(resolved.all()):  # flat distributions: sort those rows fully
            rest = (~resolved).nonzero().squeeze(1)
            tau[rest] = _top_p_threshold(z[rest], s[rest], top_p[rows][rest], V)[0]
        thr[rows] = torch.maximum(thr[rows], tau)
    return thr


def sample_tokens_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor, generator: torch.Generator | None = None,
                        row_seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [B], logprobs fp32 [B]); invalid rows (NaN/+inf logits, no finite logit) get NaN.

    Arguments are validated per-row tensors (see `erpo_fast.kernels.sampling.sample_tokens`). With
    `row_seeds` (int64 [B]) row r's noise comes from the counter-based stream of row_seeds[r] alone
    (`counter_rng.uniforms`), else from `torch.rand` with `generator`.
    """
    B, V = logits.shape
    thr = kept_thresholds(logits, temperature, top_k, top_p)
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // V)
    for r0 in range(0, B, rows_per_chunk):
        r1 = min(B, r0 + rows_per_chunk)
        z = logits[r0:r1].float()
        t = temperature[r0:r1].unsqueeze(1)
        greedy = t.squeeze(1) == 0
        s = z / torch.where(greedy.unsqueeze(1), 1.0, t)
        row_thr = thr[r0:r1]
        if bool(torch.isfinite(row_thr).any()):
            s.masked_fill_(z < row_thr.unsqueeze(1), -torch.inf)  # NaN is kept, so it poisons its row
        # NaN/+inf logits, or a row without a finite kept logit, make the whole softmax row NaN: that NaN
        # reaches the log-prob and marks the row invalid without a separate pass over the logits.
        probs = torch.softmax(s, dim=1)
        if row_seeds is None:
            u = torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        else:
            u = uniforms(row_seeds[r0:r1], V)
        noise = u.log_().neg_()
        tok = (probs / noise).argmax(1)  # argmax p / E with E ~ Exp(1): a draw from p (exponential race)
        if bool(greedy.any()):
            tok = torch.where(greedy, z.argmax(1), tok)
        p_tok = probs.gather(1, tok.unsqueeze(1)).squeeze(1)
        tokens[r0:r1] = tok
        logprobs[r0:r1] = torch.where(greedy, p_tok * 0.0, p_tok.log())
    return tokens, logprobs
