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
