"""erpo_fast.metrics.Metrics against hand computations: exact means however the parts are split, totals, maxima, and
one all-reduce over 2 gloo processes that hold different names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from erpo_fast.metrics import Metrics

# Two ranks' parts of one step: (name, value, weight) means, a total and maxima. Rank 1 alone measured "mismatch".
PARTS = [
    dict(means=[("clip_frac", 0.5, 4), ("clip_frac", 0.0, 2)], total=7, maxes={"ratio_max": 1.5}),
    dict(means=[("clip_frac", 0.25, 8), ("mismatch", 2.0, 3)], total=5, maxes={"ratio_max": 3.0}),
]
# By hand: clip_frac = (0.5*4 + 0*2 + 0.25*8) / (4+2+8) = 4/14; tokens = 7+5; ratio_max = 3; mismatch = 2.
EXPECTED = {"clip_frac": 4 / 14, "tokens": 12, "ratio_max": 3.0, "mismatch": 2.0}


def _part(part: dict) -> Metrics:
    m = Metrics()
    for name, value, weight in part["means"]:
        m.mean(name, value, weight)
    m.total("tokens", part["total"])
    m.add(part["maxes"])
    return m


def test_means_totals_and_maxima_by_hand():
    merged = _part(PARTS[0]).update(_part(PARTS[1]))
    assert merged.result() == pytest.approx(EXPECTED, rel=1e-15)
    assert isinstance(merged.result()["tokens"], int)
    # Not the mean of the parts' means (1/3 and 1/4): the parts differ in size.
    assert merged.result()["clip_frac"] != pytest.approx((1 / 3 + 1 / 4) / 2)
    # One process: all_reduce is a copy.
    assert merged.all_reduce().result() == merged.result()


def test_add_takes_maxima_by_name_and_weights_the_rest():
    m = Metrics()
    m.add({"ratio_mean": 1.0, "ratio_max": 2.0}, weight=3)
    m.add({"ratio_mean": 2.0, "ratio_max": 1.0}, weight=1)
    assert m.result() == {"ratio_mean": pytest.approx(5 / 4), "ratio_max": 2.0}


def test_a_mean_without_weight_has_no_value():
    m = Metrics()
    m.mean("mismatch", 0.7, weight=0)
    m.max("mismatch_max", 0.0)
    assert m.result() == {"mismatch_max": 0.0}


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = _part(PARTS[rank]).all_reduce().result()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_two_ranks_reduce_to_the_hand_values(tmp_path):
    from test_learner_fsdp import spawn_ranks

    spawn_ranks(_worker, str(tmp_path / "store"), str(tmp_path), what="Metrics.all_reduce")
    for rank in (0, 1):  # every rank gets the same values, the name only rank 1 held included
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == pytest.approx(EXPECTED, rel=1e-15), rank
