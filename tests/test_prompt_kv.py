"""SharedPromptKVCache (erpo_fast/engines/prompt_kv.py): its attention against a float64 reference over explicit
per-row key/value lists, and the native engine with it against the per-row cache and transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal_lm

from erpo_fast.engines import NativeEngine
from erpo_fast.engines.prompt_kv import SharedPromptKVCache


def _reference_attention(q, prompt_k, prompt_v, prompt_len, resp_k, resp_v, scaling):
    """float64 softmax attention of one row: q [kv_heads, G, d] over its prompt's keys then its own."""
    keys = torch.cat((prompt_k[:, :prompt_len], resp_k), dim=1).double()  # [kv_heads, L, d]
    values = torch.cat((prompt_v[:, :prompt_len], resp_v), dim=1).double()
    scores = torch.einsum("hgd,hld->hgl", q.double(), keys) * scaling
    return torch.einsum("hgl,hld->hgd", torch.softmax(scores, dim=-1), values)


@pytest.mark.parametrize("compact", [False, True])
def test_decode_attention_matches_float64_reference_per_row(compact):
    g = torch.Generator().manual_seed(0)
    prompts, n, kv_heads, groups, d, new, steps = 3, 4, 2, 3, 8, 6, 4
    lengths = torch.tensor([5, 2, 7])
    cache = SharedPromptKVCache(1, prompts, n, kv_heads, lengths, new, d, torch.float32, torch.device("cpu"))
    pk = torch.randn(prompts, kv_heads, 7, d, generator=g)
    pv = torch.randn(prompts, kv_heads, 7, d, generator=g)
    for i in range(prompts):  # each prompt written at its own length, as the bucketed prefill does
        cache.prefill_prompts = torch.tensor([i])
        cache.write_prefill(0, pk[i:i + 1, :, : lengths[i]], pv[i:i + 1, :, : lengths[i]])
    rows = torch.arange(prompts * n)  # live rows -> their (prompt, sample) place
    history_k, history_v = [], []  # every row's response k/v so far (by original row)
    for step in range(steps):
        if compact and step == 2:  # rows of every prompt finish (prompt 1 keeps one row only)
            keep = torch.tensor([0, 2, 3, 5, 8, 9, 11])
            cache.keep_rows(keep)
            rows = rows[keep]
        live = len(rows)
        q = torch.randn(live, kv_heads, groups, d, generator=g)
        k, v = torch.randn(live, kv_heads, d, generator=g), torch.randn(live, kv_heads, d, generator=g)
        full_k = torch.zeros(prompts * n, kv_heads, d)
        full_v = torch.zeros(prompts * n, kv_heads, d)
        full_k[rows], full_v[rows] = k, v
        history_k.append(full_k)
        history_v.append(full_v)
        cache.kv_len = int(lengths.max()) + step + 1
        got = cache.decode_attention(0.35, groups)(0, q, k, v)
        for j, r in enumerate(rows.tolist()):
            i = r // n
            resp_k = torch.stack([h[r] for h in history_k], dim=1)  # [kv_heads, step + 1, d]
            resp_v = torch.stack([h[r] for h in history_v], dim=1)
            want = _reference_attention(q[j], pk[i], pv[i], int(lengths[i]), resp_k, resp_v, 0.35)
            torch.testing.assert_close(got[j].double(), want, rtol=1e-5, atol=1e-5)


# ---- the engine ----------------------------------------------------------------------------------


PROMPTS = [[5, 9, 17, 33, 2, 60, 61, 62, 63], [40, 41], [7, 7, 8, 90, 12, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("compact_below,max_batch_rows", [(0.0, None), (1.0, None), (0.5, 8)])
def test_engine_with_shared_prompt_kv_samples_as_with_per_row_copies(kind, compact_below, max_batch_rows):
    stops = list(range(3, 96, 7))  # rows stop at staggered steps, so compaction runs
    out = {}
    for share in (True, False):
        engine = NativeEngine(tiny_causal_lm(kind), compact_below=compact_below, max_batch_rows=max_batch_rows,
                              share_prompt_kv=share)
        out[share] = engine.generate(PROMPTS, [1.0, 0.8, 1.2, 1.0], n=4, max_new_tokens=12, stop_token_ids=stops,
                                     seed=[3, 4, 5, 6])
    lengths = {len(s.token_ids) for group in out[True] for s in group}
    assert len(lengths) > 2  # staggered stops did happen
    for group_shared, group_rows in zip(out[True], out[False]):
        for a, b in zip(group_shared, group_rows):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs)) < 1e-5


def test_engine_uses_the_shared_cache_only_where_it_shares(monkeypatch):
    from erpo_fast.engines import native

    made = []
    real = native.SharedPromptKVCache

    def recording(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "SharedPromptKVCache", recording)
    engine = NativeEngine(tiny_causal_lm("llama"))
    engine.generate(PROMPTS[:2], [1.0, 1.0], n=1, max_new_tokens=3, stop_token_ids=[], seed=0)
    assert made == []  # one sample per prompt: nothing to share
    engine.generate(PROMPTS[:2], [1.0, 1.0], n=3, max_new_tokens=3, stop_token_ids=[], seed=0)
    assert len(made) == 1
    NativeEngine(tiny_causal_lm("llama"), backend="hf").generate(PROMPTS[:2], [1.0, 1.0], n=3, max_new_tokens=3,
                                                                 stop_token_ids=[], seed=0)
    assert len(made) == 1  # transformers' modules read the per-row cache
