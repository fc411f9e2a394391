"""The rollout/learner contract: what the rollout side hands the learner, and how it is packed for the model.

:class:`RolloutSequence` is one sampled response with its loss inputs; :class:`StepBatch` is one step's sequences
and rollout metrics (`erpo_fast.rollout.Rollout.collect` builds it, `erpo_fast.learner.Learner.train_on`
consumes it); :func:`pack_sequences` turns sequences into a :class:`PackedBatch`: one row without padding plus
the per-token loss inputs at the trained positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .packed_attention import PackedLayout

__all__ = ["IGNORE_INDEX", "PackedBatch", "RolloutSequence", "StepBatch", "micro_batches", "pack_sequences",
           "packed_length"]

IGNORE_INDEX = -100


@dataclass
class RolloutSequence:
    """One sampled response with everything the loss needs.

    ``rollout_logprobs[j]`` is the engine's log-prob of ``response_ids[j]`` under its processed distribution
    (it may be empty when no IS correction is used). ``seq_key`` identifies the sequence inside its batch.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    temperature: float
    advantage: float
    seq_key: int

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError(f"sequence {self.seq_key}: prompt_ids is empty (the first response token needs "
                             "a prompt position to be predicted from)")
        if self.rollout_logprobs and len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(f"sequence {self.seq_key}: {len(self.rollout_logprobs)} rollout_logprobs for "
                             f"{len(self.response_ids)} response tokens")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sequence {self.seq_key}: temperature must be > 0 and finite, "
                             f"got {self.temperature}")


@dataclass
class StepBatch:
    """What crosses from the rollout side to the learner in one step (see `erpo_fast.rollout.Rollout`).

    ``sequences``: this rank's kept samples; ``metrics``: the rollout side's step metrics (rewards, residual
    fractions, temperatures, phase times); ``global_sequences`` / ``global_response_tokens``: the counts over
    every rank (0 sequences everywhere: every group was dropped by dynamic sampling, and no rank updates).
    """

    sequences: list[RolloutSequence]
    metrics: dict
    global_sequences: int
    global_response_tokens: int


@dataclass
class PackedBatch:
    """Sequences packed into one row (no padding) plus the per-token loss inputs at the TRAINED positions.

    Full-row tensors (length L = sum of prompt + response lengths, or less with shared prompts):
    ``input_ids``/``position_ids`` [1, L], ``labels`` [L] (the next token at positions that predict a response
    token, ``-100`` elsewhere; at a shared prompt's last position, the first response token of the last sample
    sharing it) and ``row_seq`` [L] (index of each position's sequence; the first sample's for a shared prompt).
    Trained positions only (N = total response tokens, in sequence order, response order): ``label_index`` [N]
    (their indices in the row: where ``labels`` holds a response token), ``target_ids``, ``temperature``,
    ``advantages``, ``seq_ids``, ``rollout_logprobs`` (NaN where the engine gave none). ``segments``: per
    sequence, ``(prompt start, prompt length, response start, response length)`` in the row, for packed attention.
    """

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor
    row_seq: Tensor
    label_index: Tensor
    target_ids: Tensor
    temperature: Tensor
    advantages: Tensor
    seq_ids: Tensor
    rollout_logprobs: Tensor
    response_lengths: list[int] = field(default_factory=list)
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    _layout: PackedLayout | None = field(default=None, repr=False)

    def layout(self) -> PackedLayout:
        """Where each sequence sits in the row, for packed attention (built on first use, then cached)."""
        if self._layout is None:
            self._layout = PackedLayout.from_segments(self.segments, int(self.input_ids.shape[1]),
                                                      self.input_ids.device)
        return self._layout

    @property
    def num_tokens(self) -> int:
        return int(self.label_index.numel())

    @property
    def num_sequences(self) -> int:
        """Sequences with at least one trained token (the seq_* aggregations' S)."""
        return sum(1 for n in self.response_lengths if n > 0)


def pack_sequences(sequences: Sequence[RolloutSequence], *, temperature: str | float = "row",
                   vocab_size: int | None = None, device: torch.device | str = "cpu",
                   share_prompts: bool = False) -> PackedBatch:
    """Pack ``sequences`` (prompt + response each) into one padding-free row; see :class:`PackedBatch`.

    Response token j of a sequence with prompt length P sits at row offset P + j and is predicted from offset
    P + j - 1, which therefore carries label ``response_ids[j]``. ``temperature="row"`` uses each sequence's
    own sampling temperature, a float uses that value for every token.

    ``share_prompts``: consecutive sequences with the same prompt (a GRPO group's samples) store it once; each
    response follows in the row with positions continuing from the prompt, and its first token is predicted
    from the shared prompt's last position. The decoder then runs each prompt once per group instead of n
    times; only packed attention (:meth:`PackedBatch.layout`) can run such a row.
    """
    is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if temperature != "row" and not (is_number and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be 'row' or a positive float, got {temperature!r}")
    ids: list[int] = []
    pos: list[int] = []
    row_seq: list[int] = []
    label_index: list[int] = []
    temps: list[float] = []
    advs: list[float] = []
    seq_ids: list[int] = []
    rollout: list[float] = []
    lengths: list[int] = []
    targets: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    last_prompt, prompt_start = None, -1
    for s, seq in enumerate(sequences):
        prompt, response = list(seq.prompt_ids), list(seq.response_ids)
        if vocab_size is not None and not all(0 <= t < vocab_size for t in prompt + response):
            bad = next(t for t in prompt + response if not 0 <= t < vocab_size)
            raise ValueError(f"sequence {seq.seq_key}: token id {bad} is outside the model vocabulary "
                             f"[0, {vocab_size})")
        p, r = len(prompt), len(response)
        if not (share_prompts and prompt == last_prompt):
            prompt_start, last_prompt = len(ids), prompt
            ids.extend(prompt)
            pos.extend(range(p))
            row_seq.extend([s] * p)
        start = len(ids)  # of the response
        ids.extend(response)
        pos.extend(range(p, p + r))
        row_seq.extend([s] * r)
        if r:  # token j is predicted from the token before it: the prompt's last one for j = 0
            label_index.append(prompt_start + p - 1)
            label_index.extend(range(start, start + r - 1))
        targets.extend(response)
        segments.append((prompt_start, p, start, r))
        temps.extend([float(seq.temperature if temperature == "row" else temperature)] * r)
        advs.extend([float(seq.advantage)] * r)
        seq_ids.extend([s] * r)
        rollout.extend(seq.rollout_logprobs if seq.rollout_logprobs else [float("nan")] * r)
        lengths.append(r)
    dev = torch.device(device)
    input_ids = torch.tensor(ids, dtype=torch.long)
    label_index_t = torch.tensor(label_index, dtype=torch.long)
    targets_t = torch.tensor(targets, dtype=torch.long)
    labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
    labels[label_index_t] = targets_t
    return PackedBatch(
        input_ids=input_ids[None].to(dev),
        position_ids=torch.tensor(pos, dtype=torch.long)[None].to(dev),
        labels=labels.to(dev),
        row_seq=torch.tensor(row_seq, dtype=torch.long, device=dev),
        label_index=label_index_t.to(dev),
        target_ids=targets_t.to(dev),
        temperature=torch.tensor(temps, dtype=torch.float32, device=dev),
        advantages=torch.tensor(advs, dtype=torch.float32, device=dev),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long, device=dev),
        rollout_logprobs=torch.tensor(rollout, dtype=torch.float32, device=dev),
        response_lengths=lengths,
        segments=segments,
    )


def packed_length(sequences: Sequence[RolloutSequence], *, share_prompts: bool) -> int:
    """Length of the row :func:`pack_sequences` builds from ``sequences`` (a shared prompt counts once)."""
    total, last = 0, None
    for seq in sequences:
        if not (share_prompts and seq.prompt_ids == last):
            total += len(seq.prompt_ids)
            last = seq.prompt_ids
        total += len(seq.response_ids)
    return total


def micro_batches(sequences: Sequence[RolloutSequence], *, max_sequences: int, max_tokens: int = 0,
                  share_prompts: bool = False) -> list[list[int]]:
    """Contiguous index ranges of ``sequences``, each at most ``max_sequences`` long and, when ``max_tokens > 0``,
    packing to at most ``max_tokens`` row positions (a single longer sequence forms its own micro-batch).

    Greedy in order, so a group's samples stay together (and share their prompt) wherever the budget allows;
    the gradient does not depend on the split (every micro-batch is scaled by the global normaliser).
    """
    out: list[list[int]] = []
    current: list[int] = []
    tokens, last = 0, None
    for i, seq in enumerate(sequences):
        shared = share_prompts and bool(current) and seq.prompt_ids == last
        cost = len(seq.response_ids) + (0 if shared else len(seq.prompt_ids))
        if current and (len(current) >= max_sequences or (max_tokens > 0 and tokens + cost > max_tokens)):
            out.append(current)
            current, tokens = [], 0
            cost = len(seq.response_ids) + len(seq.prompt_ids)  # a new row repeats the prompt
        current.append(i)
        tokens += cost
        last = seq.prompt_ids
    if current:
        out.append(current)
    return out
