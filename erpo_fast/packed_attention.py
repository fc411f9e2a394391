"""Packed-row attention whose cost is linear in the number of sequences (sdpa, any device).

The learner packs a micro-batch into ONE row without padding. Under plain ``sdpa`` transformers then builds a
dense block-diagonal ``[T, T]`` mask for the packed length T, so attention costs O(T^2) instead of the
O(sum L_i^2) of the sequences themselves (32x the work at 32 sequences, growing with the micro-batch).

Here every projection, norm and MLP still runs on the padding-free row, and only attention regroups the tokens:
each layer gathers q/k/v into padded ``[B, H, L, D]`` blocks of sequences of similar length and calls
``F.scaled_dot_product_attention(is_causal=True)``, then scatters the outputs back into row order. Padding sits
AFTER each sequence's real tokens, so under the causal mask no real query ever sees it, and the padded queries'
outputs are dropped: the result is the per-sequence attention exactly, never touching a dense mask.

A GRPO group's samples share their prompt, which the row holds once. Its causal self-attention then runs once
too (a causal block of the prompt alone), and each response's queries attend to the prompt plus themselves in a
suffix block: one small lower-right causal mask per block instead of recomputing (and back-propagating) the
prompt's attention for every sample, 0.3-0.6x the attention time at 60-200-token prompts and 64 response tokens.

Use: :func:`enable_packed_attention` switches a model that runs ``sdpa`` to the registered implementation
``PACKED_SDPA`` (nothing is serialised: a saved config.json does not name it), and :func:`packed_hidden_state`
runs the decoder on a packed row with a :class:`PackedLayout`. Called WITHOUT a layout (any ordinary forward,
generate, padding masks) the implementation is plain sdpa, masks included, so the model stays usable as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PACKED_SDPA", "CausalBlock", "PackedLayout", "SuffixBlock", "enable_packed_attention", "length_buckets",
           "packed_hidden_state", "packed_sdpa_attention", "shares_prompt_attention"]

PACKED_SDPA = "erpo_packed_sdpa"

# A sequence joins the current attention block while it is at least this fraction of the block's longest, so
# padding costs at most ~1/0.8^2 - 1 = 56% extra attention work (attention only; projections never see padding)
# and lengths spanning 64x still make only ~19 blocks per layer.
_BLOCK_LENGTH_RATIO = 0.8

# A group's responses attend to their shared prompt through a masked suffix block while they are at most this
# long (or at most twice the prompt); see shares_prompt_attention.
_SUFFIX_MAX_RESPONSE = 256


def length_buckets(lengths: Sequence[int], ratio: float = _BLOCK_LENGTH_RATIO) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first: an index joins the current batch while its
    length is at least ``ratio`` of the batch's longest (the padded work one batch wastes stays bounded)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


class CausalBlock(NamedTuple):
    """Sequences of similar length attending causally to themselves, every token a query.

    ``gather`` [batch * width] holds the row index of token j of the block's i-th sequence at ``i * width + j``
    (padding slots repeat that sequence's first token: any finite value works, causality hides it)."""

    gather: Tensor
    batch: int
    width: int


class SuffixBlock(NamedTuple):
    """Responses whose prompt is computed elsewhere (once per group): each response's tokens are the queries, its
    prompt then itself the keys. All of a block's prompts have length ``prompt``, so one lower-right causal
    ``mask`` [width, prompt + width] (query j sees keys 0 .. prompt + j) serves every sequence; padding sits after
    each response, where only padded queries see it."""

    query_gather: Tensor  # [batch * width]
    key_gather: Tensor  # [batch * (prompt + width)]
    batch: int
    width: int
    prompt: int
    mask: Tensor


def shares_prompt_attention(prompt: int, longest_response: int, samples: int) -> bool:
    """Whether a prompt held once for ``samples`` responses runs its attention once (suffix blocks) rather than
    once per sample. The suffix block's masked rectangle skips no work above the diagonal, so past
    ``_SUFFIX_MAX_RESPONSE`` response tokens, unless the prompt is at least half as long, recomputing the prompt per
    sample is cheaper (measured on CPU, fp32 and bf16, at 15-500-token prompts and 64-1024-token responses:
    bench/bench_packed_attention.py, bench/NOTES.md)."""
    return samples > 1 and prompt > 0 and longest_response <= max(_SUFFIX_MAX_RESPONSE, 2 * prompt)


@dataclass
class PackedLayout:
    """Where each sequence of a packed row sits, precomputed once per micro-batch and shared by every layer.

    ``blocks``: causal attention blocks (:class:`CausalBlock`); ``suffix_blocks``: responses attending to a
    shared prompt (:class:`SuffixBlock`). ``scatter`` [T]: for each row token, its slot in the concatenation of
    all blocks' query outputs (causal blocks first, then suffix blocks). Each row token is a query in exactly one
    slot except where a prompt shared by samples that do not share its attention is recomputed per sample.
    """

    blocks: list[CausalBlock]
    suffix_blocks: list[SuffixBlock]
    scatter: Tensor
    total: int

    @property
    def query_slots(self) -> int:
        """Query rows of all attention blocks, padding included (what autograd keeps per head)."""
        return sum(b.batch * b.width for b in self.blocks) + sum(b.batch * b.width for b in self.suffix_blocks)

    @property
    def key_slots(self) -> int:
        """Key (and value) rows of all attention blocks, padding included."""
        return (sum(b.batch * b.width for b in self.blocks)
                + sum(b.batch * (b.prompt + b.width) for b in self.suffix_blocks))

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[int, int, int, int]], total: int,
                      device: torch.device | str = "cpu", share_prompt_attention: bool | None = None
                      ) -> PackedLayout:
        """Layout of attention sequences that are each two ranges of a row of ``total`` tokens.

        Sequence i is row tokens ``a0 .. a0+alen-1`` then ``b0 .. b0+blen-1`` for ``segments[i] = (a0, alen,
        b0, blen)``. Ranges may be shared: a group's samples all name the one copy of their prompt as their
        first range (the row holds it once). Every row token must belong to some sequence.

        ``share_prompt_attention`` (default: on CPU, where it was measured): a prompt range named by several
        sequences runs its causal self-attention once, and each response attends to it through a suffix block
        (where :func:`shares_prompt_attention` says that is cheaper). Otherwise each sample's block recomputes its
        prompt and the first sequence holding a token provides its output (all are equal).
        """
        lengths = [int(al) + int(bl) for _, al, _, bl in segments]
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"a packed layout needs sequences of positive length, got {lengths}")
        if share_prompt_attention is None:
            share_prompt_attention = torch.device(device).type == "cpu"
        uses = Counter((a0, al) for a0, al, _, _ in segments)
        longest: dict[tuple[int, int], int] = {}
        for a0, al, _, bl in segments:
            longest[(a0, al)] = max(longest.get((a0, al), 0), bl)
        shared = {key for key, n in uses.items()
                  if share_prompt_attention and shares_prompt_attention(key[1], longest[key], n)}
        # Whole sequences (causal blocks): those whose prompt is not shared, and each shared prompt alone.
        whole = [seg for seg in segments if seg[:2] not in shared]
        whole += [(a0, al, a0 + al, 0) for a0, al in dict.fromkeys(s[:2] for s in segments) if (a0, al) in shared]
        suffixes = [seg for seg in segments if seg[:2] in shared and seg[3] > 0]

        scatter = torch.full((total,), -1, dtype=torch.long)
        blocks = _causal_blocks(whole, scatter, device)
        offset = sum(b.batch * b.width for b in blocks)
        suffix_blocks = _suffix_blocks(suffixes, scatter, offset, device)
        if bool((scatter < 0).any()):
            raise ValueError("every row token must belong to a sequence of the packed layout")
        return cls(blocks=blocks, suffix_blocks=suffix_blocks, scatter=scatter.to(device), total=total)


def _two_ranges(a0: int, alen: int, b0: int, blen: int, width: int) -> Tensor:
    """Row indices of range a then range b, padded to ``width`` with a's first token (finite, never attended)."""
    slot = torch.arange(width)
    return torch.where(slot < alen, a0 + slot, torch.where(slot < alen + blen, b0 + slot - alen, a0))


def _causal_blocks(whole: list[tuple[int, int, int, int]], scatter: Tensor, device) -> list[CausalBlock]:
    """Causal blocks of the ``whole`` sequences by length; writes their tokens' output slots into ``scatter``."""
    blocks, offset = [], 0
    base = [0] * len(whole)  # first output slot of each sequence
    lengths = [al + bl for _, al, _, bl in whole]
    for group in length_buckets(lengths):
        width = lengths[group[0]]
        for b, i in enumerate(group):
            base[i] = offset + b * width
        blocks.append(CausalBlock(torch.cat([_two_ranges(*whole[i], width) for i in group]).to(device),
                                  len(group), width))
        offset += len(group) * width
    for i in reversed(range(len(whole))):  # the lowest-numbered sequence holding a token writes last
        a0, al, b0, bl = whole[i]
        scatter[a0: a0 + al] = base[i] + torch.arange(al)
        scatter[b0: b0 + bl] = base[i] + al + torch.arange(bl)
    return blocks


def _suffix_blocks(suffixes: list[tuple[int, int, int, int]], scatter: Tensor, offset: int, device
                   ) -> list[SuffixBlock]:
    """Suffix blocks of the responses in ``suffixes`` by prompt length (one mask per block: groups with equal
    prompt lengths share blocks), then by response length; their output slots start at ``offset``."""
    by_prompt: dict[int, list[tuple[int, int, int, int]]] = {}
    for seg in suffixes:
        by_prompt.setdefault(seg[1], []).append(seg)
    blocks = []
    for prompt, segs in by_prompt.items():
        for group in length_buckets([bl for *_, bl in segs]):
            width = segs[group[0]][3]
            for b, i in enumerate(group):
                _, _, b0, bl = segs[i]
                scatter[b0: b0 + bl] = offset + b * width + torch.arange(bl)
            queries = torch.cat([_two_ranges(segs[i][2], segs[i][3], 0, 0, width) for i in group])
            keys = torch.cat([_two_ranges(*segs[i], prompt + width) for i in group])
            mask = torch.ones(width, prompt + width, dtype=torch.bool).tril(prompt)
            blocks.append(SuffixBlock(queries.to(device), keys.to(device), len(group), width, prompt, mask.to(device)))
            offset += len(group) * width
    return blocks


def packed_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_layout: PackedLayout | None = None, **kwargs) -> tuple[Tensor, None]:
    """The ``PACKED_SDPA`` attention function (transformers' attention-interface signature).

    query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]`` of one packed row; returns ``[1, T, Hq, D]``. Without a
    ``packed_layout`` it is transformers' own sdpa attention (masks and all).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("packed attention runs full causal attention only (no sliding window, no softcap)")
    if query.shape[0] != 1 or query.shape[2] != packed_layout.total:
        raise ValueError(f"packed attention expects one row of {packed_layout.total} tokens, "
                         f"got query {tuple(query.shape)}")
    heads, kv_heads = query.shape[1], key.shape[1]
    # [T, H, D] token-major views: index_select gathers whole tokens.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))

    def attend(batch, queries, keys, **mask):  # queries/keys: [batch * length] row indices
        o = F.scaled_dot_product_attention(*(t.index_select(0, g).unflatten(0, (batch, -1)).transpose(1, 2)
                                             for t, g in ((q, queries), (k, keys), (v, keys))),
                                           dropout_p=dropout, scale=scaling, enable_gqa=heads != kv_heads, **mask)
        return o.transpose(1, 2).flatten(0, 1)  # [batch * query length, heads, dim]

    outs = [attend(b.batch, b.gather, b.gather, is_causal=True) for b in packed_layout.blocks]
    outs += [attend(b.batch, b.query_gather, b.key_gather, attn_mask=b.mask) for b in packed_layout.suffix_blocks]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, packed_layout.scatter)[None], None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # Ordinary forwards (no layout) get sdpa's masks; packed forwards bypass mask creation altogether.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def _full_attention_only(config) -> bool:
    if getattr(config, "use_sliding_window", False) or getattr(config, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


def enable_packed_attention(model: nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to ``PACKED_SDPA``; returns whether packed attention is now on.

    Left alone (False): other implementations (flash-attn's varlen path is already linear; eager is a deliberate
    choice), sliding-window or logit-softcapping models, and models without transformers' attention interface.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == PACKED_SDPA:
        return True
    if current != "sdpa" or not _full_attention_only(config) or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(PACKED_SDPA)
    return True


def packed_hidden_state(decoder: nn.Module, input_ids: Tensor, position_ids: Tensor,
                        layout: PackedLayout) -> Tensor:
    """The decoder's last hidden state ``[1, T, H]`` on one packed row, with packed attention.

    A prepared per-layer-type mask mapping (all None) makes transformers skip building any mask; the layout
    reaches every attention call through the forward's keyword arguments (and is kept by activation
    checkpointing for the recompute).
    """
    config = decoder.config
    if config._attn_implementation != PACKED_SDPA:
        raise ValueError(f"packed_hidden_state needs enable_packed_attention(model) first "
                         f"(attention is {config._attn_implementation!r})")
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        masks = dict.fromkeys(set(layer_types) | {"full_attention"})
    else:
        # Decoders without per-layer-type masks (Llama) take no mapping; a 4-D mask is returned by transformers
        # as-is, so this one-element placeholder also skips mask building (packed attention never reads it).
        masks = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=masks, use_cache=False,
                  packed_layout=layout)
    return out.last_hidden_state
