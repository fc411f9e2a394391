"""The built-in arithmetic task: level contents, exact answers, disjoint deterministic splits."""

from __future__ import annotations

import operator
import re
from collections import Counter

import pytest

from erpo_fast.tasks.arithmetic import LEVELS, iter_level, level_size, make_splits
from erpo_fast.tasks.arithmetic import reward as arithmetic_reward

# The level table of the module docstring, restated independently: op -> (a range, b range, relation).
DOCUMENTED_LEVELS = {
    1: [("+", range(0, 100), range(0, 10), None)],
    2: [("-", range(0, 100), range(0, 10), operator.ge)],
    3: [("*", range(0, 10), range(0, 10), None), ("-", range(0, 10), range(0, 10), operator.lt)],
    4: [("+", range(10, 100), range(10, 100), None), ("-", range(10, 100), range(10, 100), operator.ge)],
    5: [("*", range(10, 100), range(2, 10), None)],
    6: [("+", range(100, 1000), range(100, 1000), None), ("-", range(100, 1000), range(100, 1000), operator.ge)],
}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    match = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt)
    assert match, prompt
    return int(match[1]), match[2], int(match[3])


def in_level(level: int, a: int, op: str, b: int) -> bool:
    return any(op == o and a in ra and b in rb and (rel is None or rel(a, b))
               for o, ra, rb, rel in DOCUMENTED_LEVELS[level])


def test_level_sizes_match_brute_force_count():
    assert sorted(LEVELS) == sorted(DOCUMENTED_LEVELS)
    for level, families in DOCUMENTED_LEVELS.items():
        expected = sum(sum(1 for a in ra for b in rb if rel is None or rel(a, b)) for _, ra, rb, rel in families)
        assert level_size(level) == expected, level


@pytest.mark.parametrize("level", [1, 2, 3, 5])
def test_iter_level_enumerates_each_problem_exactly_once(level):
    problems = list(iter_level(level, seed=3))
    assert len(problems) == level_size(level)
    assert len({p.prompt for p in problems}) == len(problems)
    assert all(in_level(level, *parse_prompt(p.prompt)) and p.level == level for p in problems)


def test_splits_are_exact_disjoint_and_follow_the_level_table():
    train, heldout = make_splits(seed=0, num_train=600, num_heldout=150, levels=(1, 2, 3, 4, 5, 6))
    assert len(train) == 600 and len(heldout) == 150
    train_prompts, heldout_prompts = [p.prompt for p in train], [p.prompt for p in heldout]
    assert len(set(train_prompts)) == 600 and len(set(heldout_prompts)) == 150
    assert not set(train_prompts) & set(heldout_prompts)
    assert len({p.id for p in train + heldout}) == 750
    for p in train + heldout:
        a, op, b = parse_prompt(p.prompt)
        assert in_level(p.level, a, op, b), p
        assert p.answer == str(OPS[op](a, b))
        assert p.id == f"L{p.level}:{p.prompt[:-1]}"
        assert arithmetic_reward(p.solution, p.answer) == 1.0  # the warm-start target is graded correct
    # Spread evenly over the levels: 600 / 6 = 100 train each, 150 / 6 = 25 held-out each.
    assert Counter(p.level for p in train) == {level: 100 for level in range(1, 7)}
    assert Counter(p.level for p in heldout) == {level: 25 for level in range(1, 7)}


def test_small_levels_are_capped_and_the_rest_spread_over_the_others():
    train, heldout = make_splits(seed=0, num_train=500, num_heldout=100, levels=(3, 4))
    # Level 3 has 145 problems: at most a fifth (29) held out, the other 116 all go to train.
    assert Counter(p.level for p in heldout) == {3: 29, 4: 71}
    assert Counter(p.level for p in train) == {3: 116, 4: 384}


def test_splits_are_deterministic_in_the_seed_and_heldout_ignores_num_train():
    a_train, a_heldout = make_splits(seed=7, num_train=300, num_heldout=50)
    b_train, b_heldout = make_splits(seed=7, num_train=300, num_heldout=50)
    assert a_train == b_train and a_heldout == b_heldout
    c_train, c_heldout = make_splits(seed=8, num_train=300, num_heldout=50)
    assert [p.prompt for p in c_heldout] != [p.prompt for p in a_heldout]
    _, d_heldout = make_splits(seed=7, num_train=700, num_heldout=50)
    assert d_heldout == a_heldout


def test_default_mix_has_every_default_level():
    train, heldout = make_splits()
    assert len(train) == 1000 and len(heldout) == 200
    assert set(Counter(p.level for p in train)) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("kwargs, message", [
    ({"levels": (1, 9)}, "unknown arithmetic level"),
    ({"levels": ()}, "at least one level"),
    ({"levels": (1, 1)}, "must not repeat"),
    ({"levels": (3,), "num_train": 200, "num_heldout": 10}, "hold only"),
    ({"num_train": -1}, "num_train"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_splits(**kwargs)
