"""pass@k / mean@k: the unbiased estimator against brute-force enumeration of k-subsets."""

import itertools

import numpy as np
import pytest

from erpo_fast.evaluate import pass_at_k, summarize


@pytest.mark.parametrize("n,c,k", [(4, 0, 4), (4, 1, 4), (16, 3, 4), (16, 0, 16), (16, 16, 1), (8, 5, 3), (6, 2, 1)])
def test_pass_at_k_equals_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_summarize_mean_and_pass():
    rewards = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=float)
    out = summarize(rewards, ks=(1, 4))
    assert out["mean_at_4"] == pytest.approx(5 / 12)
    assert out["pass_at_4"] == pytest.approx(2 / 3)  # prompts 0 and 2 solved at least once
    assert out["pass_at_1"] == pytest.approx((1 / 4 + 0 + 1) / 3)  # pass@1 = per-prompt accuracy
