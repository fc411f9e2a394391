"""Ctrl-C during a run (erpo_fast/interrupts.py): SIGINT sent to this very process at chosen points of a real run.

Each run test fails on the code before it: the checkpoint being written was lost, a swallowed interrupt let the run
finish with exit 0 (CI once saw an async Ctrl-C end with 0), a library's wrapped interrupt ended as a crash, and an
async clean-up failing on a cut pipe left the rollout process running."""

import contextlib
import json
import os
import signal

import pytest
from test_train import TINY

import erpo_fast.train as train_module
from erpo_fast.checkpoint import latest_intact_checkpoint
from erpo_fast.interrupts import CtrlC
from erpo_fast.learner import Learner
from erpo_fast.logger import read_metrics


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # CPython's os.kill runs the Python handler before it returns


def _run(out):
    return train_module.main([*TINY, "--output-dir", str(out), "--max-steps", "6", "--trainer.save_every", "2",
                              "--trainer.eval_every", "0"])


def _events(out, kind):
    lines = (out / "events.jsonl").read_text().splitlines() if (out / "events.jsonl").exists() else []
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


# ---- the guard alone ------------------------------------------------------------------------------------------

def test_ctrl_c_raises_at_once_outside_deferred_blocks_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()
        assert ctrl_c.pressed and not ctrl_c.deferred_press
    assert signal.getsignal(signal.SIGINT) is before


def test_one_ctrl_c_inside_deferred_finishes_the_block_then_raises():
    done = []
    with CtrlC() as ctrl_c, pytest.raises(KeyboardInterrupt), ctrl_c.deferred():
        _ctrl_c()
        done.append("rest of the block")
    assert done == ["rest of the block"] and ctrl_c.deferred_press


def test_a_second_ctrl_c_inside_deferred_raises_at_once():
    done = []
    with CtrlC() as ctrl_c, pytest.raises(KeyboardInterrupt), ctrl_c.deferred():
        _ctrl_c()
        _ctrl_c()
        done.append("not reached")
    assert done == []


def test_check_raises_for_a_swallowed_ctrl_c():
    with CtrlC() as ctrl_c:
        with contextlib.suppress(KeyboardInterrupt):  # what a library that drops it does
            _ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()


# ---- a real run -----------------------------------------------------------------------------------------------

def test_ctrl_c_during_a_checkpoint_lets_it_land_whole_then_stops(tmp_path, monkeypatch):
    save_optimizer = Learner.save_optimizer

    def pressed_mid_save(self, directory):  # checkpoint 4 is under way: its folder exists, nothing is complete
        if "step_00000004" in str(directory):
            _ctrl_c()
        return save_optimizer(self, directory)

    monkeypatch.setattr(Learner, "save_optimizer", pressed_mid_save)
    out = tmp_path / "run"
    assert _run(out) == 130
    assert latest_intact_checkpoint(out).name.endswith("4")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    [event] = _events(out, "interrupted")
    assert "finished first" in event["message"]


def test_a_swallowed_ctrl_c_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    train_step = train_module.train_step

    def swallowing(s, step, logger):
        if step == 3:
            with contextlib.suppress(KeyboardInterrupt):  # a library that drops the interrupt
                _ctrl_c()
        return train_step(s, step, logger)

    monkeypatch.setattr(train_module, "train_step", swallowing)
    out = tmp_path / "run"
    assert _run(out) == 130
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert len(_events(out, "interrupted")) == 1


def test_a_library_error_caused_by_ctrl_c_is_reported_as_the_interrupt(tmp_path, monkeypatch):
    train_step = train_module.train_step

    def wrapping(s, step, logger):
        if step == 3:
            try:
                _ctrl_c()
            except KeyboardInterrupt as e:  # what torch.distributed.checkpoint does with it
                raise RuntimeError("CheckpointException ranks: [0]") from e
        return train_step(s, step, logger)

    monkeypatch.setattr(train_module, "train_step", wrapping)
    out = tmp_path / "run"
    assert _run(out) == 130
    assert len(_events(out, "interrupted")) == 1 and not _events(out, "stopped")


def test_async_ctrl_c_with_an_unreadable_results_pipe_still_stops_the_rollout_process(tmp_path, monkeypatch):
    """Seen once in 134 async Ctrl-Cs of a repro loop: the interrupt cut the learner's read of a message short,
    and the drain in close() then failed on the rest of it (EOFError), skipping the rollout process's shutdown."""
    from erpo_fast.async_rollout import AsyncRollout

    collect, seen = AsyncRollout.collect, {}

    class CutShort:  # the results queue after a read was cut mid-message: every further read fails
        def get(self, *args, **kwargs):
            raise EOFError("Ran out of input")

        def cancel_join_thread(self):
            pass

        def close(self):
            pass

    def cut_at_step_3(self, step):
        if step == 3:
            seen["process"], self._queue = self._proc, CutShort()
            _ctrl_c()
        return collect(self, step)

    monkeypatch.setattr(AsyncRollout, "collect", cut_at_step_3)
    out = tmp_path / "run"
    assert train_module.main([*TINY, "--output-dir", str(out), "--max-steps", "6", "--trainer.eval_every", "0",
                              "--trainer.async_steps", "1"]) == 130
    assert not seen["process"].is_alive()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
