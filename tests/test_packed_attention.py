"""Packed attention (erpo_fast.packed_attention) against Hugging Face run on each sequence alone.

Exactness: in float64 the packed row's hidden states, a loss on them and every parameter gradient equal those
of transformers' own sdpa forward of each sequence separately (no packing, no padding). Linear cost is checked
structurally, not timed: a packed forward never asks transformers for a mask.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from erpo_fast.packed_attention import PACKED_SDPA, PackedLayout, enable_packed_attention, packed_hidden_state


def qwen2(seed=0, attn="sdpa", **overrides):
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    kw.update(overrides)
    config = Qwen2Config(**kw)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def random_sequences(lengths, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def layout_of(lengths):
    """Layout of sequences of ``lengths`` packed back to back into one row (no shared prompts)."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return PackedLayout.from_segments([(s, n, s + n, 0) for s, n in zip(starts, lengths)], sum(lengths))


def packed_inputs(seqs):
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    return ids, pos, layout_of([len(s) for s in seqs])


# Lengths from 1 to 40 in shuffled order: several attention blocks, singletons, and sequences whose row order
# differs from their block order.
LENGTHS = [7, 1, 40, 13, 13, 2, 31, 33, 5, 19, 8, 40, 3]


def test_layout_is_a_permutation_into_real_slots():
    layout = layout_of(LENGTHS)
    starts = torch.tensor([0] + LENGTHS[:-1]).cumsum(0)
    gathered = torch.cat([g for g, _, _ in layout.blocks])
    # Token t of the row sits at slot scatter[t], and that slot gathers token t back.
    assert torch.equal(gathered[layout.scatter], torch.arange(sum(LENGTHS)))
    assert len(set(layout.scatter.tolist())) == sum(LENGTHS)
    # Each block is sequences of similar length, the longest first, padded to it.
    for gather, batch, width in layout.blocks:
        assert gather.numel() == batch * width
        rows = gather.view(batch, width)
        seq_of = [int((starts <= r[0]).nonzero().max()) for r in rows]
        assert LENGTHS[seq_of[0]] == width
        assert all(LENGTHS[i] >= 0.8 * width for i in seq_of)
    assert 1 < len(layout.blocks) < len(LENGTHS)
    with pytest.raises(ValueError, match="positive length"):
        layout_of([3, 0])
    with pytest.raises(ValueError, match="positive length"):
        layout_of([])


def test_packed_forward_and_gradients_equal_each_sequence_alone_float64():
    reference = qwen2(seed=1).double()
    packed = copy.deepcopy(reference)
    assert enable_packed_attention(packed)
    seqs = random_sequences(LENGTHS, seed=2)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(len(s), 48, generator=g, dtype=torch.float64) for s in seqs]

    alone = [reference.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs]
    ref_loss = sum((h * w).sum() for h, w in zip(alone, weights))
    ref_loss.backward()

    ids, pos, layout = packed_inputs(seqs)
    hidden = packed_hidden_state(packed.model, ids, pos, layout)[0]
    loss = (hidden * torch.cat(weights)).sum()
    loss.backward()

    torch.testing.assert_close(hidden, torch.cat(alone).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, p in packed.named_parameters():
        if name == "lm_head.weight":  # untied and unused by a hidden-state loss
            assert p.grad is None and ref_params[name].grad is None
            continue
        checked += 1
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert checked == len(ref_params) - 1


def shared_prompt_row(groups, seed=0, vocab=97):
    """A row as ``pack_sequences(share_prompts=True)`` lays it out: each group's prompt once, then its responses.
    ``groups``: (prompt length, [response lengths]). Returns (full sequences, row ids, positions, segments)."""
    g = torch.Generator().manual_seed(seed)
    seqs, ids, pos, segments = [], [], [], []
    for prompt_len, responses in groups:
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
        a0 = len(ids)
        ids += prompt.tolist()
        pos += list(range(prompt_len))
        for r in responses:
            response = torch.randint(0, vocab, (r,), generator=g)
            segments.append((a0, prompt_len, len(ids), r))
            ids += response.tolist()
            pos += list(range(prompt_len, prompt_len + r))
            seqs.append(torch.cat([prompt, response]))
    return seqs, torch.tensor(ids)[None], torch.tensor(pos)[None], segments


# Groups: two with equal prompt lengths (one suffix block for both), an empty response, a lone sample (its own
# causal block), and responses past the suffix limit with a shorter prompt (the prompt recomputed per sample).
SHARED_GROUPS = [(9, [4, 7, 0, 7]), (9, [5, 5]), (23, [3, 12, 11]), (6, [8]), (4, [260, 300])]


def test_shared_prompts_equal_each_sequence_alone_float64():
    reference = qwen2(seed=12, max_position_embeddings=512).double()
    seqs, ids, pos, segments = shared_prompt_row(SHARED_GROUPS, seed=13)
    g = torch.Generator().manual_seed(14)
    weights = torch.randn(ids.shape[1], 48, generator=g, dtype=torch.float64)

    alone = [reference.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs]
    # The row's hidden states from the sequences alone: a prompt from its group's first sample.
    expected = torch.empty(ids.shape[1], 48, dtype=torch.float64)
    for (a0, al, b0, bl), h in zip(reversed(segments), reversed(alone)):
        expected[a0: a0 + al] = h[:al].detach()
        expected[b0: b0 + bl] = h[al:].detach()
    # The same loss on the reference: a shared prompt's weight counts once (on the first sample holding it).
    ref_loss, seen = 0.0, set()
    for (a0, al, b0, bl), h in zip(segments, alone):
        if a0 not in seen:
            ref_loss = ref_loss + (h[:al] * weights[a0: a0 + al]).sum()
            seen.add(a0)
        ref_loss = ref_loss + (h[al:] * weights[b0: b0 + bl]).sum()
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if name != "lm_head.weight"}

    grads = {}
    for share in (True, False):
        packed = copy.deepcopy(reference)
        packed.zero_grad(set_to_none=True)
        assert enable_packed_attention(packed)
        layout = PackedLayout.from_segments(segments, ids.shape[1], share_prompt_attention=share)
        # Suffix blocks: the short responses, by prompt length (the two 9-token groups mix) and response length
        # (7, 7 | 5, 5, 4 and 12, 11 | 3); the long-response group, the lone sample and prompts alone are causal.
        assert sorted((b.prompt, b.batch) for b in layout.suffix_blocks) == (
            [(9, 2), (9, 3), (23, 1), (23, 2)] if share else [])
        hidden = packed_hidden_state(packed.model, ids, pos, layout)[0]
        (hidden * weights).sum().backward()
        torch.testing.assert_close(hidden.detach(), expected, rtol=1e-12, atol=1e-12)
        grads[share] = {name: p.grad for name, p in packed.named_parameters() if name != "lm_head.weight"}
    for name, want in ref_grads.items():
        # The prompt's attention once or per sample: the same gradient to rounding.
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-10, atol=1e-12, msg=name)
        # Against the sequences alone: HF's RMSNorm computes in float32 even in a float64 model, so summing a
        # shared prompt's gradient before the norm (the row) or after it (each sequence) differs at ~1e-7 of
        # the gradient's scale.
        err = (grads[True][name] - want).abs().max() / want.abs().max()
        assert err < 1e-6, (name, float(err))  # measured at most 7e-8


def test_when_a_prompt_shares_its_attention():
    from erpo_fast.packed_attention import shares_prompt_attention

    assert shares_prompt_attention(40, 256, 2) and shares_prompt_attention(300, 600, 8)
    assert not shares_prompt_attention(40, 257, 8)  # long responses: the masked block would cost more
    assert not shares_prompt_attention(300, 601, 8)
    assert not shares_prompt_attention(40, 8, 1)  # nothing to share
    assert not shares_prompt_attention(0, 8, 8)


def test_shared_prompt_attention_runs_each_query_once():
    """Structure, not time: with the prompt's attention shared, every row token is a query in exactly one real
    slot, and the keys are each group's prompt once per sample plus each response (no prompt query is repeated);
    without it each sample re-queries its prompt."""
    _, ids, _, segments = shared_prompt_row([(40, [8] * 8), (35, [6, 8, 7, 8])], seed=15)
    total = ids.shape[1]
    on = PackedLayout.from_segments(segments, total, share_prompt_attention=True)
    off = PackedLayout.from_segments(segments, total, share_prompt_attention=False)
    assert not off.suffix_blocks and on.suffix_blocks
    queries = torch.cat([b.gather for b in on.blocks] + [b.query_gather for b in on.suffix_blocks])
    assert torch.equal(queries[on.scatter], torch.arange(total))
    real_queries = sum(al + sum(bl for a, _, _, bl in segments if a == a0) for a0, al in {s[:2] for s in segments})
    assert real_queries == total
    # Blocks: the two prompts alone (35 padded to 40), the 8 responses of 8 to their 40-token prompt, then by
    # length the 8, 8, 7 (padded to 8) and the 6 to the 35-token prompt.
    assert on.query_slots == 2 * 40 + 8 * 8 + 3 * 8 + 6
    assert on.key_slots == 2 * 40 + 8 * (40 + 8) + 3 * (35 + 8) + (35 + 6)
    assert off.query_slots >= 8 * (40 + 8) + 4 * (35 + 6)  # every sample re-queries its prompt


def test_packed_float32_matches_unpacked_tightly():
    reference = qwen2(seed=4, num_key_value_heads=6)  # MHA (no GQA grouping) in fp32
    packed = copy.deepcopy(reference)
    assert enable_packed_attention(packed)
    seqs = random_sequences([9, 30, 4, 30, 17], seed=5)
    with torch.no_grad():
        alone = torch.cat([reference.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs])
        hidden = packed_hidden_state(packed.model, *packed_inputs(seqs))[0]
    torch.testing.assert_close(hidden, alone, rtol=1e-5, atol=1e-5)


def test_packed_forward_builds_no_mask(monkeypatch):
    """The point of the layout: transformers never materialises the [T, T] block-diagonal mask."""
    import transformers.masking_utils as mu

    model = qwen2(seed=6)
    assert enable_packed_attention(model)
    seqs = random_sequences([5, 9, 3], seed=7)

    def forbidden(*args, **kwargs):
        raise AssertionError("a mask was built")

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, PACKED_SDPA, forbidden)
    with torch.no_grad():
        packed_hidden_state(model.model, *packed_inputs(seqs))
        # Control: an ordinary forward on the same model does build one (so the patch is live).
        with pytest.raises(AssertionError, match="a mask was built"):
            model.model(input_ids=torch.cat(seqs)[None], position_ids=packed_inputs(seqs)[1], use_cache=False)


def test_llama_packed_forward_equals_each_sequence_alone_and_builds_no_mask(monkeypatch):
    """Llama's decoder (SmolLM2) takes no per-layer-type mask mapping; packing must work there too."""
    import transformers.masking_utils as mu
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        reference = LlamaForCausalLM(config).double()
    packed = copy.deepcopy(reference)
    assert enable_packed_attention(packed)
    seqs = random_sequences([9, 30, 4, 30, 17], seed=11)

    def forbidden(*args, **kwargs):
        raise AssertionError("a mask was built")

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, PACKED_SDPA, forbidden)
    with torch.no_grad():
        alone = torch.cat([reference.model(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs])
        hidden = packed_hidden_state(packed.model, *packed_inputs(seqs))[0]
    torch.testing.assert_close(hidden, alone, rtol=1e-12, atol=1e-12)


def test_without_a_layout_the_model_is_plain_sdpa_masks_included():
    reference = qwen2(seed=8)
    packed = copy.deepcopy(reference)
    assert enable_packed_attention(packed)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :7] = 0
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=mask).logits
        b = packed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_enable_leaves_other_implementations_and_saves_a_plain_config(tmp_path):
    assert not enable_packed_attention(qwen2(attn="eager"))
    windowed = qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not enable_packed_attention(windowed)
    assert windowed.config._attn_implementation == "sdpa"
    capped = qwen2()
    capped.config.attn_logit_softcapping = 50.0  # Gemma-2 style; sdpa cannot apply it either
    assert not enable_packed_attention(capped)

    model = qwen2(seed=10)
    assert enable_packed_attention(model)
    assert enable_packed_attention(model)  # idempotent
    with pytest.raises(ValueError, match="enable_packed_attention"):
        packed_hidden_state(qwen2().model, *packed_inputs(random_sequences([3, 4])))
    model.save_pretrained(tmp_path)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert reloaded.config._attn_implementation == "sdpa"
