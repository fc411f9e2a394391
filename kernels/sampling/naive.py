"""Plain-torch reference sampler: sort-based top-k / top-p masks, then `torch.multinomial`.

Obviously correct and slow on purpose; every fast backend must match its distribution. All math is in
float64 regardless of the logits' dtype.

Processing order (as in vLLM and Hugging Face): temperature, then top-k, then top-p.

Boundary rule, shared by every backend so that they can be compared exactly:
- top-k keeps every token whose logit is >= the k-th largest logit (tokens tied with the k-th value are
  all kept; this is vLLM's `logits < kth_value -> -inf` rule).
- top-p sorts the (temperature-scaled, top-k-renormalised) probabilities in descending order and keeps the
  smallest prefix whose cumulative probability reaches `top_p` (the token that crosses `top_p` is kept,
  as in HF/vLLM), extended to all tokens tied with the last kept logit. Equivalently: a token is kept iff
  the probability mass of tokens with a *strictly larger* logit is < top_p.
Both rules are expressed as "keep logits >= a per-row threshold", which is what the fast backends compute by
selection instead of sorting.

Temperature 0 means greedy: the token is the first argmax of the logits and its log-prob is exactly 0 (the
processed distribution is a point mass).
"""

from __future__ import annotations

import torch


def kept_mask_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> torch.Tensor:
    """Bool [B, V]: tokens that survive top-k then top-p (all True for disabled rows).

    `temperature` [B] (>0 rows matter; greedy rows get an all-True mask), `top_k` int [B] (<=0 or >=V: off),
    `top_p` float [B] (>=1: off).
    """
    z = logits.double()
    V = z.shape[1]
    t = temperature.double().clamp_min(1e-30).unsqueeze(1)  # greedy rows: mask unused
    sorted_z, _ = torch.sort(z, dim=1, descending=True)
    k = top_k.long().clone()
    k[(k <= 0) | (k >= V)] = V
    kth = sorted_z.gather(1, (k - 1).unsqueeze(1))
    keep = z >= kth
    # top-p on the renormalised top-k distribution, walking the sorted logits.
    sorted_keep = sorted_z >= kth
    s = torch.where(sorted_keep, sorted_z / t, torch.full_like(sorted_z, -torch.inf))
    probs = torch.softmax(s, dim=1)
    exclusive_cumsum = torch.cumsum(probs, dim=1) - probs
    n_kept = (exclusive_cumsum < top_p.double().unsqueeze(1)).sum(1, keepdim=True)  # >= 1 (first is 0)
    n_kept = torch.minimum(n_kept, sorted_keep.sum(1, keepdim=True))
    threshold = sorted_z.gather(1, n_kept - 1)
    p_on = (top_p < 1).unsqueeze(1)
    keep = keep & (~p_on | (z >= threshold))
    return keep


def processed_logprobs_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                                 top_p: torch.Tensor) -> torch.Tensor:
    """Float64 [B, V] log-probs of the processed distribution (-inf outside top-k/top-p).

    Greedy rows (temperature 0) are a point mass on the first argmax: 0 there, -inf elsewhere.
    """
    z = logits.double()
    keep = kept_mask_reference(logits, temperature, top_k, top_p)
    t = temperature.double().unsqueeze(1)
    greedy = (t == 0)
    s = torch.where(keep, z / torch.where(greedy, 1.0, t), torch.full_like(z, -torch.inf))
    logp = torch.log_softmax(s, dim=1)
    point = torch.full_like(z, -torch.inf)
    point.scatter_(1, z.argmax(1, keepdim=True), 0.0)
    return torch.where(greedy, point, logp)


def sample_tokens_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                            top_p: torch.Tensor, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from the processed distribution: (tokens int64 [B], logprobs fp32 [B]).

    Arguments are already-validated per-row tensors (see `erpo_fast.kernels.sampling.sample_tokens`).
    """
    bad = torch.isnan(logits).any(1) | (logits == torch.inf).any(1) | (logits == -torch.inf).all(1)
    if bad.any():
        raise ValueError(f"logits rows {bad.nonzero().flatten().tolist()} contain NaN or +inf, or have no "
                         "finite logit")
    logp = processed_logprobs_reference(logits, temperature, top_k, top_p)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1).float()
