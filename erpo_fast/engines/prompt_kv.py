"""A decode cache that keeps a prompt's k/v once for its n samples, and the attention that reads it once.

GRPO samples n responses per prompt. RaggedKVCache (native.py) copies each prompt's k/v into its n rows, and each
row's decode attention reads its own copy: the prompt's keys and values cross the memory bus n times per layer
and step, which on CPU is most of the decode attention's time once the prompts are longer than the responses
(GSM8K-like prompts of 60-200 tokens, 64-128 new tokens). Here:

- ``prompt_keys[layer]``: ``[prompts, kv_heads, longest prompt, head_dim]``, prompt i valid below its length;
- ``response_keys[layer]``: ``[rows, kv_heads, max_new_tokens, head_dim]``, slot t = the t-th sampled token's
  (every live row is at the same slot, so this part needs no mask).

The attention scores a prompt's n x G queries (G query heads per kv head) against its keys in one matmul and each
row's query against its own response keys, takes one softmax over both parts, and sums the two value products.
Rows that finished and were compacted away keep their place in the prompt-grouped matmul as zero queries, whose
results are dropped. Same values as RaggedKVCache's path to fp32 rounding (tests/test_prompt_kv.py compares the
engine both ways and against transformers).
"""

from __future__ import annotations

import torch


class SharedPromptKVCache:
    def __init__(self, num_layers: int, num_prompts: int, n: int, kv_heads: int, prompt_lengths: torch.Tensor,
                 max_new_tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        longest = int(prompt_lengths.max())
        prompt_shape = (num_prompts, kv_heads, longest, head_dim)
        response_shape = (num_prompts * n, kv_heads, max_new_tokens, head_dim)
        # zeros: masked prompt slots must hold finite values (0 * value stays 0)
        self.prompt_keys = [torch.zeros(prompt_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.prompt_values = [torch.zeros(prompt_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.response_keys = [torch.empty(response_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.response_values = [torch.empty(response_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_prompts, self.n, self.longest = num_prompts, n, longest
        # [prompts, longest]: 0 where a prompt has a token, -inf past its end (added to the prompt part's scores)
        beyond = torch.arange(longest, device=device)[None] >= prompt_lengths.to(device)[:, None]
        self.prompt_bias = torch.zeros(beyond.shape, dtype=dtype, device=device).masked_fill_(beyond, float("-inf"))
        self.slots: torch.Tensor | None = None  # after compaction: each live row's place in the prompts x n grid
        # Set by the engine, as for RaggedKVCache.
        self.prefill_prompts: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.kv_len = 0

    @property
    def rows(self) -> int:
        return self.response_keys[0].shape[0]

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: ``[batch, kv_heads, L, head_dim]`` for the prompts ``self.prefill_prompts``, stored once each."""
        length = k.shape[2]
        self.prompt_keys[layer][self.prefill_prompts, :, :length] = k
        self.prompt_values[layer][self.prefill_prompts, :, :length] = v

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep only ``rows`` (a 1-D index into the live rows), in that order."""
        self.response_keys = [k.index_select(0, rows) for k in self.response_keys]
        self.response_values = [v.index_select(0, rows) for v in self.response_values]
        self.slots = rows if self.slots is None else self.slots[rows]

    def decode_attention(self, scaling: float, groups: int):
        """``attend(layer, q, k, v)`` for this step: q ``[rows, kv_heads, G, d]``, the new token's k, v
        ``[rows, kv_heads, d]``, written at this step's response slot; returns ``[rows, kv_heads, G, d]``."""
        step = self.kv_len - 1 - self.longest  # the response slot of the token being decoded
        prompts, n, longest = self.num_prompts, self.n, self.longest
        kv_heads = self.response_keys[0].shape[1]
        rows = self.rows
        bias = self.prompt_bias[:, None, None].expand(prompts, kv_heads, 1, longest).reshape(
            prompts * kv_heads, 1, longest)
        slots = self.slots

        def by_prompt(x: torch.Tensor) -> torch.Tensor:
            """[rows, kv_heads, G, m] -> [prompts * kv_heads, n * G, m]: each prompt's rows side by side."""
            if slots is not None:  # compacted: finished rows come back as zeros in their place
                full = x.new_zeros((prompts * n,) + x.shape[1:])
                full[slots] = x
                x = full
            m = x.shape[-1]
            return x.view(prompts, n, kv_heads, groups, m).transpose(1, 2).reshape(prompts * kv_heads, n * groups, m)

        def by_row(x: torch.Tensor) -> torch.Tensor:
            """The inverse of by_prompt: [prompts * kv_heads, n * G, m] -> [rows * kv_heads, G, m]."""
            m = x.shape[-1]
            x = x.view(prompts, kv_heads, n, groups, m).transpose(1, 2).reshape(prompts * n, kv_heads, groups, m)
            return (x if slots is None else x[slots]).reshape(rows * kv_heads, groups, m)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            d = q.shape[-1]
            self.response_keys[layer][:, :, step] = k
            self.response_values[layer][:, :, step] = v
            keys_p = self.prompt_keys[layer].view(prompts * kv_heads, longest, d)
            values_p = self.prompt_values[layer].view(prompts * kv_heads, longest, d)
            # [rows, kv_heads, slots, d] slices merge into [rows * kv_heads, slots, d] views (no copy)
            keys_r = self.response_keys[layer][:, :, : step + 1].reshape(rows * kv_heads, step + 1, d)
            values_r = self.response_values[layer][:, :, : step + 1].reshape(rows * kv_heads, step + 1, d)
            scores_p = by_row(torch.baddbmm(bias, by_prompt(q), keys_p.mT, alpha=scaling))
            scores_r = torch.bmm(q.reshape(rows * kv_heads, groups, d), keys_r.mT).mul_(scaling)
            probs = torch.softmax(torch.cat((scores_p, scores_r), dim=-1), dim=-1)
            probs_p, probs_r = probs.split((longest, step + 1), dim=-1)
            out = by_row(torch.bmm(by_prompt(probs_p.reshape(rows, kv_heads, groups, longest)), values_p))
            return out.baddbmm_(probs_r, values_r).view(rows, kv_heads, groups, d)

        return attend
