"""Prompt datasets: loading and its errors, stable prompt ids across restarts, the resumable batch sampler."""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpo_fast.data import (
    DataError,
    PromptIndex,
    PromptRecord,
    PromptSampler,
    load_prompts,
    problem_records,
)
from erpo_fast.tasks.arithmetic import make_splits

ROWS = [
    {"id": "q1", "prompt": "What is 2+2?", "answer": 4},
    {"prompt": "Solve x+1=3.", "answer": "2"},
    {"id": 17, "prompt": "Half of 1?", "answer": "\\frac{1}{2}"},
]


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


EXPECTED = [
    PromptRecord(key="q1", prompt="What is 2+2?", answer="4"),
    PromptRecord(key=sha1("Solve x+1=3."), prompt="Solve x+1=3.", answer="2"),
    PromptRecord(key="17", prompt="Half of 1?", answer="\\frac{1}{2}"),
]


def write_jsonl(path, rows, blank_line=False):
    lines = [json.dumps(r) for r in rows]
    if blank_line:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl(tmp_path):
    assert load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS, blank_line=True)) == EXPECTED


def test_load_parquet(tmp_path):
    table = pa.table({"id": ["q1", None, "17"], "prompt": [r["prompt"] for r in ROWS],
                      "answer": ["4", "2", "\\frac{1}{2}"], "extra": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert load_prompts(tmp_path / "d.parquet") == EXPECTED
    # Integer answers (an int64 column) come back as text, and no id column means content keys.
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": [2, 4]}), tmp_path / "n.parquet")
    assert load_prompts(tmp_path / "n.parquet") == [PromptRecord(sha1("1+1="), "1+1=", "2"),
                                                     PromptRecord(sha1("2+2="), "2+2=", "4")]


def test_loading_errors_name_the_file_and_place(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"unsupported dataset format '\.csv'"):
        load_prompts(tmp_path / "d.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c", answer}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        load_prompts(bad)
    with pytest.raises(DataError, match=r"line 2: missing field 'answer'"):
        load_prompts(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}]))
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet: missing field 'answer'"):
        load_prompts(tmp_path / "m.parquet")
    pq.write_table(pa.table({"prompt": ["a", None], "answer": ["1", "2"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"row 1: missing field 'prompt'"):
        load_prompts(tmp_path / "n.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"line 1: field 'prompt' must be a string"):
        load_prompts(write_jsonl(tmp_path / "t.jsonl", [{"prompt": ["a"], "answer": "1"}]))
    with pytest.raises(DataError, match=r"line 1: expected a JSON object"):
        load_prompts(write_jsonl(tmp_path / "l.jsonl", [[1, 2]]))
    assert issubclass(DataError, ValueError)


def test_duplicates(tmp_path, caplog):
    rows = [{"id": "a", "prompt": "1+1=", "answer": 2}, {"id": "a", "prompt": "2+2=", "answer": 4}]
    with pytest.raises(DataError, match=r"line 2: duplicate id 'a' \(first at line 1\)"):
        load_prompts(write_jsonl(tmp_path / "d.jsonl", rows))
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "1+1=", "answer": 3}]
    with pytest.raises(DataError, match="different answer"):
        load_prompts(write_jsonl(tmp_path / "c.jsonl", rows))
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "3+3=", "answer": 6}, {"prompt": "1+1=", "answer": "2"}]
    with caplog.at_level(logging.WARNING, logger="erpo_fast.data"):
        records = load_prompts(write_jsonl(tmp_path / "r.jsonl", rows))
    assert [r.prompt for r in records] == ["1+1=", "3+3="]
    assert "1 repeated prompts" in caplog.text


def test_prompt_ids_survive_restart_reorder_and_growth(tmp_path):
    records = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS))
    index = PromptIndex()
    ids = index.add(r.key for r in records)
    assert ids.tolist() == [0, 1, 2] and ids.dtype.name == "int64"
    saved = json.loads(json.dumps(index.state_dict()))  # as a checkpoint would store it

    # Restart with the dataset reordered and one prompt added.
    new_row = {"prompt": "What is 3*3?", "answer": 9}
    reordered = load_prompts(write_jsonl(tmp_path / "e.jsonl", [ROWS[2], new_row, ROWS[0], ROWS[1]]))
    restored = PromptIndex()
    restored.load_state_dict(saved)
    new_ids = restored.add(r.key for r in reordered)
    by_key = dict(zip((r.key for r in reordered), new_ids.tolist()))
    assert [by_key[r.key] for r in records] == [0, 1, 2]
    assert by_key[sha1("What is 3*3?")] == 3 and len(restored) == 4
    assert restored.ids(["17", "q1"]).tolist() == [2, 0]
    with pytest.raises(KeyError, match="not in the index"):
        restored.ids(["nope"])


def test_builtin_arithmetic_records():
    problems_train, problems_heldout = make_splits(seed=3, num_train=40, num_heldout=10)
    train, heldout = problem_records(problems_train), problem_records(problems_heldout)
    assert [(r.key, r.prompt, r.answer) for r in train] == [(p.id, p.prompt, p.answer) for p in problems_train]
    assert [(r.key, r.prompt, r.answer) for r in heldout] == \
        [(p.id, p.prompt, p.answer) for p in problems_heldout]


def test_sampler_epochs_are_shuffled_permutations():
    sampler = PromptSampler(num_prompts=10, batch_size=4, seed=1)
    counter = PromptSampler(num_prompts=10, batch_size=4, seed=1)
    epoch_after = []
    for _ in range(3):
        counter.next_batch()
        epoch_after.append(counter.epoch)
    assert epoch_after == [0, 0, 1]  # 2 batches per epoch
    epochs = [[i for _ in range(2) for i in sampler.next_batch()] for _ in range(3)]
    for epoch in epochs:  # 8 distinct prompts per epoch; the 2-prompt tail is skipped
        assert len(set(epoch)) == 8 and set(epoch) <= set(range(10))
    assert epochs[0] != epochs[1]
    again = PromptSampler(num_prompts=10, batch_size=4, seed=1)
    assert [again.next_batch() for _ in range(6)] == [epochs[e][b * 4:b * 4 + 4] for e in range(3) for b in range(2)]
    other_seed = PromptSampler(num_prompts=10, batch_size=4, seed=2)
    assert [other_seed.next_batch() for _ in range(2)] != [epochs[0][:4], epochs[0][4:]]


def test_sampler_resume_draws_the_same_next_batches():
    reference = PromptSampler(num_prompts=13, batch_size=4, seed=5)
    expected = [reference.next_batch() for _ in range(12)]
    for stop in (0, 2, 3, 7):  # including positions at an epoch boundary
        first = PromptSampler(num_prompts=13, batch_size=4, seed=5)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PromptSampler(num_prompts=13, batch_size=4, seed=5)
        resumed.load_state_dict(state)
        assert [resumed.next_batch() for _ in range(12 - stop)] == expected[stop:]
    with pytest.raises(ValueError, match="num_prompts=13 but this run has 14"):
        PromptSampler(num_prompts=14, batch_size=4, seed=5).load_state_dict(state)


def test_sampler_splits_global_batches_across_ranks():
    single = PromptSampler(num_prompts=50, batch_size=12, seed=9)
    ranks = [PromptSampler(num_prompts=50, batch_size=12, seed=9, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):
        slices = [s.next_batch() for s in ranks]
        assert all(len(s) == 4 for s in slices)
        assert [i for s in slices for i in s] == single.next_batch()  # disjoint slices covering the batch


@pytest.mark.parametrize("kwargs, message", [
    ({"num_prompts": 10, "batch_size": 6, "world_size": 4}, "divisible by world_size"),
    ({"num_prompts": 3, "batch_size": 4}, "exceeds the number of prompts"),
    ({"num_prompts": 8, "batch_size": 4, "rank": 2, "world_size": 2}, r"rank \(2\) must be < world_size"),
    ({"num_prompts": 0, "batch_size": 1}, "num_prompts must be an integer >= 1"),
])
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptSampler(**kwargs)
