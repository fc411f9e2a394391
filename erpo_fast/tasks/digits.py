"""Built-in synthetic task `digits`: addition with every number written least-significant digit first.

A problem adds two d-digit numbers. Prompt, operands and answer are all written in reversed digit order
(units first), so "743+582=" means 347 + 285 and its answer is "236" (632 reversed; a sum ending in 0
gives a leading "0", e.g. "036"). Written this way the answer is produced in the order a person computes
it, digit by digit with carries: answer digit i is (a_i + b_i + carry) mod 10, and the carry follows from
the digits just before it. The worked solution the warm start imitates is therefore the answer itself,
the carried digit-by-digit sum, which keeps responses at most d + 1 tokens long (every token is rollout
time on a CPU).

Unlike the `arithmetic` task's answer-only facts, a problem here needs the procedure: level 3 alone has
810,000 problems and level 4 81 million, far more than a 0.8M-parameter model can memorise, so what RL
improves on its training prompts can only carry over to the held-out split as a better procedure.

Levels (level d: both operands have exactly d digits; level 1 uses 0..9). A problem and its mirror
(b + a) count as one: only one of the two is ever drawn, so no split holds the mirror of another's problem.

=====  ==========================  ===============  =============================
level  operands                    distinct sums    example (normal notation)
=====  ==========================  ===============  =============================
1      a, b in 0..9                             55  "7+5=" -> "21" (7+5=12)
2      a, b in 10..99                        4,095  "74+82=" -> "57" (47+28=75)
3      a, b in 100..999                    405,450  "743+582=" -> "236" (347+285=632)
4      a, b in 1000..9999               40,504,500
5      a, b in 10000..99999          4,050,045,000
=====  ==========================  ===============  =============================

Splits: for each level one random stream (seeded by `seed` and the level) yields distinct problems; the first
go to the held-out split, the next to the train split, the next to the warm start's worked examples
(`warm_start_problems`), so the three never share a problem, and the held-out split does not change when
only `num_train` does. Counts are spread as evenly as the levels' sizes allow (a level gives at most a fifth
of its problems to the held-out split).

The verifier (`reward`) reads the response's last run of digits and compares it with the gold answer
as text ("036" is not "36").

Default levels: 4 alone; this is the embedded default job's task (preset tiny-cpu). In the trials in
bench/NOTES.md ("Learning demo trials") a level-2 mix was memorised (4,095 problems: GRPO raised its
training prompts, not held-out ones), and the tiny model's warm start learnt the digit alignment of one operand
width but not the other in a 3,4 mix, depending on the seed. With level 4 alone, the warm start's loss sits on
a plateau until the model finds the alignment, after a seed-dependent number of steps; weight decay and many
distinct worked problems (100k, about one pass) shorten it, and stopping the warm start at a target loss gives
every seed a policy that has the procedure but still errs, from which GRPO and ERPO raise held-out accuracy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

from erpo_fast.tasks.arithmetic import MAX_HELDOUT_FRACTION, Problem, _spread

LEVELS = (1, 2, 3, 4, 5)
DEFAULT_LEVELS = (4,)  # see the module docstring: one operand width, nothing small enough to memorise
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_HELDOUT = 200

_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only (\d would take other scripts' digits)


def reverse_digits(n: int) -> str:
    """`n` (>= 0) written units first: 632 -> "236", 630 -> "036"."""
    return str(n)[::-1]


def _operand_range(level: int) -> tuple[int, int]:
    if level not in LEVELS:
        raise ValueError(f"unknown digits level {level!r}; levels are {list(LEVELS)}")
    return (0, 9) if level == 1 else (10 ** (level - 1), 10 ** level - 1)


def level_size(level: int) -> int:
    """Number of distinct problems in `level` (unordered operand pairs, doubles included)."""
    lo, hi = _operand_range(level)
    width = hi - lo + 1
    return width * (width + 1) // 2


def make_problem(a: int, b: int, level: int) -> Problem:
    prompt = f"{reverse_digits(a)}+{reverse_digits(b)}="
    answer = reverse_digits(a + b)
    return Problem(id=f"D{level}:{prompt[:-1]}", prompt=prompt, answer=answer, solution=answer, level=level)


def iter_level(level: int, seed: int) -> Iterator[Problem]:
    """Distinct problems of `level` (a problem and its mirror count once) in an order fixed by (seed, level)."""
    lo, hi = _operand_range(level)
    # A string seed is hashed with sha512 by `random`, so the stream does not depend on PYTHONHASHSEED.
    rng = random.Random(f"erpo-fast-digits:{seed}:{level}")
    seen: set[tuple[int, int]] = set()
    size = level_size(level)
    while len(seen) < size:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        pair = (min(a, b), max(a, b))
        if pair in seen:
            continue
        seen.add(pair)
        yield make_problem(a, b, level)


def _check(levels: Sequence[int], counts: dict[str, int]) -> list[int]:
    levels = list(levels)
    if not levels:
        raise ValueError("levels must name at least one level")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must not repeat, got {levels}")
    for level in levels:
        _operand_range(level)
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return levels


def make_splits(seed: int = 0, num_train: int = DEFAULT_NUM_TRAIN, num_heldout: int = DEFAULT_NUM_HELDOUT,
                levels: Sequence[int] = DEFAULT_LEVELS, num_warm_start: int = 0
                ) -> tuple[list[Problem], list[Problem]] | tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, held-out) problems over `levels`, disjoint, deterministic in `seed`; with `num_warm_start` > 0
    also a third list of that many worked examples for the warm start, disjoint from both."""
    levels = _check(levels, {"num_train": num_train, "num_heldout": num_heldout, "num_warm_start": num_warm_start})
    sizes = [level_size(level) for level in levels]
    heldout_counts = _spread(num_heldout, [int(size * MAX_HELDOUT_FRACTION) for size in sizes], "held-out")
    train_counts = _spread(num_train, [size - h for size, h in zip(sizes, heldout_counts)], "train")
    warm_counts = _spread(num_warm_start, [size - h - t for size, h, t in zip(sizes, heldout_counts, train_counts)],
                          "warm-start")
    train: list[Problem] = []
    heldout: list[Problem] = []
    warm: list[Problem] = []
    for level, n_heldout, n_train, n_warm in zip(levels, heldout_counts, train_counts, warm_counts):
        stream = iter_level(level, seed)
        heldout.extend(next(stream) for _ in range(n_heldout))
        train.extend(next(stream) for _ in range(n_train))
        warm.extend(next(stream) for _ in range(n_warm))
    return (train, heldout, warm) if num_warm_start else (train, heldout)


def reward(response: str, answer: str) -> float:
    """1.0 when the response's last run of digits equals `answer` exactly as text, else 0.0."""
    gold = str(answer).strip()
    if not _DIGITS.fullmatch(gold):
        raise ValueError(f"the digits verifier needs a digit-string answer, got {answer!r}")
    runs = _DIGITS.findall(response)
    return 1.0 if runs and runs[-1] == gold else 0.0
