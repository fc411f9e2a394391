"""Packed-row attention whose cost is linear in the number of sequences (sdpa, any device).

The learner packs a micro-batch into ONE row without padding. Under plain ``sdpa`` transformers then builds a
dense block-diagonal ``[T, T]`` mask for the packed length T, so attention costs O(T^2) instead of the
O(sum L_i^2) of the sequences themselves (32x the work at 32 sequences, growing with the micro-batch).

Here every projection, norm and MLP still runs on the padding-free row, and only attention regroups the tokens:
each layer gathers q/k/v into padded ``[B, H, L, D]`` blocks of sequences of similar length and calls
``F.scaled_dot_product_attention(is_causal=True)``, then scatters the outputs back into row order. Padding sits
AFTER each sequence's real tokens, so under the causal mask no real query ever sees it, and the padded queries'
outputs are dropped: the result is the per-sequence attention exactly, never touching a dense mask.

Use: :func:`enable_packed_attention` switches a model that runs ``sdpa`` to the registered implementation
``PACKED_SDPA`` (nothing is serialised: a saved config.json does not name it), and :func:`packed_hidden_state`
runs the decoder on a packed row with a :class:`PackedLayout`. Called WITHOUT a layout (any ordinary forward,
generate, padding masks) the implementation is plain sdpa, masks included, so the model stays usable as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PACKED_SDPA", "PackedLayout", "enable_packed_attention", "length_buckets", "packed_hidden_state",
           "packed_sdpa_attention"]

PACKED_SDPA = "erpo_packed_sdpa"

# A sequence joins the current attention block while it is at least this fraction of the block's longest, so
# padding costs at most ~1/0.8^2 - 1 = 56% extra attention work (attention only; projections never see padding)
# and lengths spanning 64x still make only ~19 blocks per layer.
_BLOCK_LENGTH_RATIO = 0.8


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


@dataclass
class PackedLayout:
    """Where each sequence of a packed row sits, precomputed once per micro-batch and shared by every layer.

    ``blocks``: per attention block, ``(gather, batch, length)``: ``gather`` [batch * length] holds the row index
    of token j of the block's i-th sequence at ``i * length + j`` (padding slots repeat that sequence's first
    token, any finite value works). ``scatter`` [T]: for each row token, its slot in the concatenation of all
    blocks' ``[batch * length]`` outputs.
    """

    blocks: list[tuple[Tensor, int, int]]
    scatter: Tensor
    total: int

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[int, int, int, int]], total: int,
                      device: torch.device | str = "cpu") -> PackedLayout:
        """Layout of attention sequences that are each two ranges of a row of ``total`` tokens.

        Sequence i is row tokens ``a0 .. a0+alen-1`` then ``b0 .. b0+blen-1`` for ``segments[i] = (a0, alen,
        b0, blen)``. Ranges may be shared: a group's samples all name the one copy of their prompt as their
        first range (the row holds it once; each sample attends to it). Every row token must belong to some
        sequence; a shared token's output is taken from the first sequence that holds it (all are equal).
        """
        lengths = [int(al) + int(bl) for _, al, _, bl in segments]
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"a packed layout needs sequences of positive length, got {lengths}")
        groups = length_buckets(lengths)
        base = [0] * len(lengths)  # first output slot of each sequence
        blocks = []
        offset = 0
        for group in groups:
            width = lengths[group[0]]
            slot = torch.arange(width)
            gather = []
            for b, i in enumerate(group):
                a0, al, b0, bl = segments[i]
                # Padding slots (after the sequence) point at its first token: finite, and masked by causality.
                gather.append(torch.where(slot < al, a0 + slot, torch.where(slot < al + bl, b0 + slot - al, a0)))
                base[i] = offset + b * width
            blocks.append((torch.cat(gather).to(device), len(group), width))
            offset += len(group) * width
        scatter = torch.full((total,), -1, dtype=torch.long)
        for i in reversed(range(len(segments))):  # the lowest-numbered sequence holding a token writes last
            a0, al, b0, bl = segments[i]
            scatter[a0: a0 + al] = base[i] + torch.arange(al)
            scatter[b0: b0 + bl] = base[i] + al + torch.arange(bl)
        if bool((scatter < 0).any()):
            raise ValueError("every row token must belong to a sequence of the packed layout")
        return cls(blocks=blocks, scatter=scatter.to(device), total=total)


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
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    # [T, H, D] token-major views: index_select gathers whole tokens.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    outs = []
    for gather, batch, width in packed_layout.blocks:
        def block(t, h, gather=gather, batch=batch, width=width):
            return t.index_select(0, gather).view(batch, width, h, dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(block(q, heads), block(k, kv_heads), block(v, kv_heads),
                                           dropout_p=dropout, scale=scaling, is_causal=True,
                                           enable_gqa=heads != kv_heads)
        outs.append(o.transpose(1, 2).reshape(batch * width, heads, dim))
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
