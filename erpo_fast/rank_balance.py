"""Even the learner's work out over the ranks (FSDP2), without changing the gradient.

Each rank trains the groups it rolled out (or was handed), so the ranks' shares of one update's work differ:
responses differ in length, and with ``trainer.skip_zero_advantage`` a rank whose groups all came back uniform has
nothing to run while another runs full micro-batches. Under FSDP2 every micro-batch is a collective, so the rank
with the most packed tokens sets the update's time. The loss is a sum over sequences scaled by a GLOBAL normaliser,
so where a sequence runs does not change the gradient: before the micro-batches, the sequences that run are handed
out again so that every rank gets about the same number of packed tokens. A unit that moves is a whole group (the
consecutive samples of one prompt, packed with the prompt once), with its old log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .batch import RolloutSequence, packed_length
from .distributed import all_gather_objects

__all__ = ["assign_units", "balance_across_ranks", "prompt_groups"]

# (a sequence, its old log-probs or None): what one rank trains in one update
Work = tuple[RolloutSequence, Tensor | None]


def prompt_groups(sequences: Sequence[RolloutSequence], *, share_prompts: bool) -> list[list[int]]:
    """Index runs of ``sequences`` that must stay together: consecutive samples of one prompt when prompts are
    shared in the packed row (the prompt runs once for them), else each sequence alone."""
    out: list[list[int]] = []
    for i, seq in enumerate(sequences):
        if share_prompts and out and sequences[out[-1][-1]].prompt_ids == seq.prompt_ids:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def assign_units(costs: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Hand every rank's units out again so that the ranks' summed costs are about equal.

    ``costs[r][i]``: the cost of rank ``r``'s unit ``i``. Returns, per rank, the ``(home rank, index)`` of the
    units it gets, in (home rank, index) order. Longest processing time first: units by cost, largest first, each
    to the rank with the least cost so far (among equals its home rank, else the lowest rank), so the largest
    rank's cost is at most 4/3 of the optimum, and a unit stays home when that is as good. Every unit stays home
    when the plan would not lower the largest rank's cost. Deterministic: every rank computes the same plan from
    the same gathered costs.
    """
    world = len(costs)
    units = sorted(((c, home, i) for home, per_rank in enumerate(costs) for i, c in enumerate(per_rank)),
                   key=lambda u: (-u[0], u[1], u[2]))
    loads = [0] * world
    plan: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for cost, home, i in units:
        least = min(loads)
        dest = home if loads[home] == least else loads.index(least)
        loads[dest] += cost
        plan[dest].append((home, i))
    if max(loads, default=0) >= max((sum(c) for c in costs), default=0):
        return [[(home, i) for i in range(len(c))] for home, c in enumerate(costs)]
    return [sorted(p) for p in plan]


def balance_across_ranks(work: Sequence[Work], *, rank: int, share_prompts: bool) -> list[Work]:
    """This rank's part of one update's work after evening out the packed tokens over the ranks (see the module
    docstring). Collective: one small all-gather of the units' costs, and one of the units that move (none when no
    unit moves). ``rank``: this process's rank in the default process group."""
    seqs = [s for s, _ in work]
    units = [[work[i] for i in idx] for idx in prompt_groups(seqs, share_prompts=share_prompts)]
    costs = [packed_length([s for s, _ in u], share_prompts=share_prompts) for u in units]
    plan = assign_units(all_gather_objects(costs))
    moves = [(home, i, dest) for dest, got in enumerate(plan) for home, i in got if home != dest]
    if not moves:
        return list(work)
    # Old log-probs travel on the CPU: a pickled CUDA tensor would unpickle onto the sender's device index.
    outgoing = {i: [(s, None if old is None else old.cpu()) for s, old in units[i]]
                for home, i, _ in moves if home == rank}
    arrived = all_gather_objects(outgoing)  # every rank's outgoing units (small: ids, floats, log-probs)
    return [w for home, i in plan[rank] for w in (units[i] if home == rank else arrived[home][i])]
