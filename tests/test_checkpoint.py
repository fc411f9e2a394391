"""Checkpoints: exact round trips, pruning, crash safety (soft and hard), load errors, RNG capture/restore."""

from __future__ import annotations

import multiprocessing
import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from erpo_fast.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def write_weights(tag: str):
    """A save_model callback that writes one small file, so tests can tell checkpoints apart."""

    def save_model(d: Path) -> None:
        (d / "weights.txt").write_text(tag)

    return save_model


def save(out, step, tag="m", state=None, keep_last=3, config=None):
    state = state if state is not None else {"s": step}
    return save_checkpoint(out, step, save_model=write_weights(tag), state=state,
                           config=config or {"trainer": {"seed": 0}}, keep_last=keep_last)


def visible(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def assert_same(a, b):
    """Exact structural equality, including container types and numpy/torch dtypes."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "tensors": {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(7)},
        "tracker": {  # the tracker's state dict is flat numpy arrays
            "temperature": rng.random(11).astype(np.float32),
            "ids": rng.integers(0, 2**40, size=11, dtype=np.int64),
            "seen": rng.random(11) > 0.5,
            "counts": rng.integers(0, 9, size=(2, 3)).astype(np.uint16),
            "empty": np.zeros((0,), dtype=np.float64),
        },
        "np_scalar": np.float64(0.1),
        "np_int": np.int32(-3),
        "nested": [1, 2.5, "x", None, True, (3, np.arange(3, dtype=np.int8)), OrderedDict(b=1, a=2)],
        "cursor": {"epoch": 2, "position": 17, "order": list(range(10))},
        "nan": float("nan"),
        5: "int key",
    }
    config = {"trainer": {"lr": 1e-6, "max_steps": 3, "output_dir": tmp_path / "run"},
              "algorithm": {"dual_clip": None, "betas": (0.9, 0.99)}}
    path = save_checkpoint(tmp_path, 10, save_model=write_weights("w10"), state=state, config=config,
                           keep_last=2)

    assert path == tmp_path / "checkpoints" / "step_00000010"
    assert latest_checkpoint(tmp_path) == path
    ck = load_checkpoint(path)
    assert ck["step"] == 10
    assert_same(ck["state"], state)
    # YAML has no tuples or paths: they come back as lists and strings; floats are exact.
    assert ck["config"] == {"trainer": {"lr": 1e-6, "max_steps": 3, "output_dir": str(tmp_path / "run")},
                            "algorithm": {"dual_clip": None, "betas": [0.9, 0.99]}}
    assert ck["model_dir"] == path / "model" and (ck["model_dir"] / "weights.txt").read_text() == "w10"
    # The torch pickle holds no numpy objects, so a plain weights_only load works on its own.
    torch.load(path / "trainer_state.pt", weights_only=True)


def test_adamw_and_scheduler_resume_continue_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(8, 4)

    def train_step(m, o, s):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
        s.step()

    for _ in range(3):
        train_step(model, opt, sched)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    path = save_checkpoint(tmp_path, 3, save_model=lambda d: None, state=state, config={}, keep_last=1)

    resumed = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    loaded = load_checkpoint(path)["state"]
    resumed.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    for _ in range(2):
        train_step(model, opt, sched)
        train_step(resumed, opt2, sched2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert_same(opt2.state_dict()["state"], opt.state_dict()["state"])


def test_model_folder_is_a_loadable_hf_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    def save_model(d):
        model.save_pretrained(d, safe_serialization=True)

    path = save_checkpoint(tmp_path, 1, save_model=save_model, state={}, config={}, keep_last=1)
    reloaded = LlamaForCausalLM.from_pretrained(load_checkpoint(path)["model_dir"])
    for (n, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), n


def test_keep_last_prunes_oldest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep_last=2)
    assert visible(tmp_path) == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    # The checkpoint just written survives even when older-numbered than what exists (resume from earlier).
    save(tmp_path, 3, keep_last=1)
    assert visible(tmp_path) == ["step_00000003"]


def test_same_step_save_replaces_old_copy(tmp_path):
    save(tmp_path, 7, tag="first", state={"v": 1})
    path = save(tmp_path, 7, tag="second", state={"v": 2})
    assert visible(tmp_path) == ["step_00000007"]
    ck = load_checkpoint(path)
    assert ck["state"] == {"v": 2} and (ck["model_dir"] / "weights.txt").read_text() == "second"


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    good = save(tmp_path, 4, tag="good", state={"v": 4})

    def exploding(d: Path) -> None:
        (d / "half.bin").write_bytes(b"\0" * 100)
        raise RuntimeError("disk full")

    for step in (5, 4):  # a new step, and a replacement of the existing one
        with pytest.raises(RuntimeError, match="disk full"):
            save_checkpoint(tmp_path, step, save_model=exploding, state={"v": 0}, config={}, keep_last=1)
        assert visible(tmp_path) == ["step_00000004"]
        assert latest_checkpoint(tmp_path) == good
        ck = load_checkpoint(good)
        assert ck["state"] == {"v": 4} and (ck["model_dir"] / "weights.txt").read_text() == "good"


def _save_then_die(out: str) -> None:
    def die(d: Path) -> None:
        (d / "half.bin").write_bytes(b"\0" * 100)
        os._exit(3)  # a hard crash: no exception handler or cleanup runs

    save_checkpoint(out, 9, save_model=die, state={"v": 9}, config={}, keep_last=1)


def test_hard_crash_mid_save_is_invisible_and_cleaned_by_next_save(tmp_path):
    good = save(tmp_path, 8, state={"v": 8})
    child = multiprocessing.get_context("fork").Process(target=_save_then_die, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    leftovers = [n for n in visible(tmp_path) if n.startswith(".tmp-step_00000009-")]
    assert len(leftovers) == 1  # the crashed save's partial folder is there...
    assert latest_checkpoint(tmp_path) == good  # ...but never returned
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoints" / leftovers[0])
    save(tmp_path, 9, state={"v": 9}, keep_last=2)
    assert visible(tmp_path) == ["step_00000008", "step_00000009"]


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nowhere") is None
    good = save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    tmp_like = root / ".tmp-step_00000050-12345"
    tmp_like.mkdir()
    (tmp_like / "COMPLETE").write_text("{}")
    (root / "step_00000040").mkdir()  # no COMPLETE marker
    (root / "step_00000060").write_text("a file, not a folder")
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(root / "step_00000040")


def test_crash_between_the_two_renames_loses_nothing(tmp_path):
    """Replacing step 3 moves the old copy aside before renaming the new one in; a crash in between must leave
    the aside copy findable and restored by the next save."""
    save(tmp_path, 3, tag="old", state={"v": 3})
    root = tmp_path / "checkpoints"
    os.rename(root / "step_00000003", root / ".replaced-step_00000003-4242")
    found = latest_checkpoint(tmp_path)
    assert found == root / ".replaced-step_00000003-4242"
    assert load_checkpoint(found)["state"] == {"v": 3}
    save(tmp_path, 4, keep_last=2)
    assert visible(tmp_path) == ["step_00000003", "step_00000004"]
    assert load_checkpoint(root / "step_00000003")["state"] == {"v": 3}


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    path = save(tmp_path, 1, state={"t": torch.randn(64)})
    blob = (path / "trainer_state.pt").read_bytes()

    (path / "trainer_state.pt").write_bytes(blob[:-10])  # truncated
    with pytest.raises(CheckpointError, match=r"corrupted checkpoint .*trainer_state.pt has \d+ bytes"):
        load_checkpoint(path)

    (path / "trainer_state.pt").write_bytes(b"\x00" * len(blob))  # right size, garbage inside
    with pytest.raises(CheckpointError, match="corrupted checkpoint file .*trainer_state.pt"):
        load_checkpoint(path)

    (path / "trainer_state.pt").write_bytes(blob)
    (path / "model" / "weights.txt").unlink()
    with pytest.raises(CheckpointError, match="model/weights.txt is missing"):
        load_checkpoint(path)

    (path / "COMPLETE").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable COMPLETE"):
        load_checkpoint(path)


def test_bad_input_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"state\['opt'\]\[0\] has type .*object"):
        save(tmp_path, 1, state={"opt": [object()]})
    with pytest.raises(ValueError, match="dtype object"):
        save(tmp_path, 1, state={"a": np.array([None, 1])})
    with pytest.raises(ValueError, match="reserved"):
        save(tmp_path, 1, state={"x": {"__erpo_fast_numpy__": 1}})
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 1, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save(tmp_path, -1)
    with pytest.raises(ValueError, match="YAML"):
        save(tmp_path, 1, config={"x": object()})
    assert latest_checkpoint(tmp_path) is None


def draw_all() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.random(3).tolist() + [float(np.random.standard_normal())],
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_capture_restore_repeats_draws_exactly_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_all()
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    rng = capture_rng_state()
    expected = draw_all()
    path = save(tmp_path, 1, state={"rng": rng})
    draw_all()  # move every stream on
    restore_rng_state(load_checkpoint(path)["state"]["rng"])
    assert draw_all() == expected
    restore_rng_state(rng)  # and straight from memory
    assert draw_all() == expected
    with pytest.raises(ValueError, match="lacks"):
        restore_rng_state({"python": rng["python"]})
