"""Run logging (metrics/events JSONL, resume truncation, progress bar, optional sinks) and PNG/text plots."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re

import numpy as np
import pytest
import torch

from erpo_fast import plots
from erpo_fast.logger import RunLogger, read_metrics
from erpo_fast.plots import ascii_histogram, write_plots


def strict_json_lines(path) -> list[dict]:
    """Parse like a strict JSON reader would: NaN/Infinity tokens are rejected."""

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def fake_step_metrics(step: int) -> dict:
    """Deterministic per-step metrics, so two runs can be compared byte for byte."""
    return {"step": step, "reward_mean": 0.1 * step, "frac_all_correct": step / 10, "loss": -0.5 * step,
            "temperature_mean": 1.0 + 0.01 * step}


def test_metrics_lines_are_strict_json_with_nonfinite_as_null(tmp_path):
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        written = logger.log_step({
            "step": np.int64(1), "loss": float("nan"), "kl": float("inf"), "neg": -math.inf,
            "reward_mean": torch.tensor(0.25), "hist": np.array([1, 2]), "clip": np.float32(0.5),
            "nested": {"a": torch.tensor([1.0, float("nan")]), 3: "x"}, "flag": True, "note": None,
        })
        logger.log_step({"step": 2, "loss": 1.5})
    records = strict_json_lines(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "loss": None, "kl": None, "neg": None, "reward_mean": 0.25,
                          "hist": [1, 2], "clip": 0.5, "nested": {"a": [1.0, None], "3": "x"}, "flag": True,
                          "note": None}
    assert records[0] == written
    assert records[1] == {"step": 2, "loss": 1.5}
    assert read_metrics(tmp_path) == records == read_metrics(tmp_path / "metrics.jsonl")


def test_bad_metrics_are_rejected(tmp_path):
    with RunLogger(tmp_path, total_steps=3, progress=False) as logger:
        with pytest.raises(ValueError, match="integer 'step'"):
            logger.log_step({"loss": 1.0})
        with pytest.raises(ValueError, match="integer 'step'"):
            logger.log_step({"step": 1.5})
        with pytest.raises(ValueError, match=r"metrics.obj has type object"):
            logger.log_step({"step": 1, "obj": object()})
    with pytest.raises(ValueError, match="start_step"):
        RunLogger(tmp_path, total_steps=3, start_step=-1)


def test_phase_times_are_logged_and_shown_on_the_progress_bar(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=2, progress=True) as logger:
        for phase in ("rollout", "learn", "sync", "rollout"):
            logger.set_phase(phase)
        record = logger.log_step({"step": 1, "reward_mean": 0.5, "time_sync_s": 99.0})
    err = capsys.readouterr().err
    # rollout ran twice: both spans add up; a key the caller already set wins.
    assert {"time_rollout_s", "time_learn_s"} <= set(record) and record["time_sync_s"] == 99.0
    assert all(record[k] >= 0 for k in ("time_rollout_s", "time_learn_s"))
    assert "rollout" in err and "reward=0.500" in err and "learn " in err and "1/2" in err

    with RunLogger(tmp_path / "quiet", total_steps=2, progress=False) as logger:
        logger.set_phase("rollout")
        record = logger.log_step({"step": 1})
    assert capsys.readouterr().err == ""
    assert set(record) == {"step", "time_rollout_s"}  # the next step starts with no phase running


def test_resume_drops_records_after_the_checkpoint_and_matches_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with RunLogger(straight, total_steps=6, progress=False) as logger:
        for step in range(1, 7):
            logger.log_event("nan_skip", "skipped", value=step)  # during step `step`, before its record
            logger.log_step(fake_step_metrics(step))

    # The interrupted run got to step 5 (and half of a line) but its last checkpoint is step 3.
    logger = RunLogger(resumed, total_steps=6, progress=False)
    for step in range(1, 6):
        logger.log_event("nan_skip", "skipped", value=step)
        logger.log_step(fake_step_metrics(step))
    logger.close()
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')
    with pytest.warns(UserWarning, match="truncated last line"), \
            RunLogger(resumed, total_steps=6, start_step=3, progress=False) as logger:
        assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log_event("nan_skip", "skipped", value=step)  # during step `step`, before its record
            logger.log_step(fake_step_metrics(step))

    assert (resumed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()

    def without_time(path):
        return [{k: v for k, v in r.items() if k != "time"} for r in strict_json_lines(path)]

    assert without_time(resumed / "events.jsonl") == without_time(straight / "events.jsonl")

    # start_step=0 is a fresh run in the same folder: the old records go.
    with RunLogger(resumed, total_steps=6, progress=False) as logger:
        logger.log_step(fake_step_metrics(1))
    assert [r["step"] for r in read_metrics(resumed)] == [1]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_events_go_to_jsonl_and_python_logging(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="erpo_fast"), \
            RunLogger(tmp_path, total_steps=5, start_step=0, progress=False) as logger:
        logger.log_step({"step": 1})
        logger.log_event("verifier_timeout", "response 3 timed out", response=3, seconds=5.0)
        logger.log_event("checkpoint", "saved", step=1, level=logging.INFO, path="x")
    events = strict_json_lines(tmp_path / "events.jsonl")
    assert [(e["step"], e["kind"], e["message"]) for e in events] == [
        (2, "verifier_timeout", "response 3 timed out"), (1, "checkpoint", "saved")]
    assert events[0]["response"] == 3 and events[0]["seconds"] == 5.0 and isinstance(events[0]["time"], float)
    levels_and_text = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "[verifier_timeout] step 2: response 3 timed out response=3 seconds=5.0") \
        in levels_and_text
    assert (logging.INFO, "[checkpoint] step 1: saved path=x") in levels_and_text


def test_optional_sinks_never_break_the_run(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # if wandb happens to be installed: no network, no account
    with caplog.at_level(logging.WARNING, logger="erpo_fast"), \
            RunLogger(tmp_path, total_steps=2, progress=False, tensorboard=True, wandb=True,
                      config={"a": 1}) as logger:
        logger.log_step({"step": 1, "reward_mean": 0.5, "loss": float("nan")})
    assert read_metrics(tmp_path) == [{"step": 1, "reward_mean": 0.5, "loss": None}]
    warnings_text = [r.getMessage() for r in caplog.records]
    if importlib.util.find_spec("tensorboard") is None:
        assert any("tensorboard is not installed" in w for w in warnings_text)
    else:
        assert any((tmp_path / "tb").glob("events.out.tfevents.*"))
    if importlib.util.find_spec("wandb") is None:
        assert any("wandb is not installed" in w for w in warnings_text)
    assert all("\n" not in w for w in warnings_text)


# ----------------------------------------------------------------------------------------------------------
# plots


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, (path, len(data))  # a drawn figure, not an empty canvas


def test_write_plots_creates_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    metrics = []
    for step in range(1, 31):
        correct = min(0.9, step / 40)
        metrics.append({
            "step": step, "reward_mean": 0.3 + 0.02 * step + 0.02 * rng.standard_normal(),
            "frac_all_correct": correct, "frac_all_wrong": 0.3 * (1 - correct),
            "frac_mixed": 0.7 * (1 - correct),
            "temperature_mean": 1.0 + 0.01 * step, "temperature_max": 1.0 + 0.03 * step,
            "entropy": None if step == 7 else 1.5 - 0.02 * step,  # a NaN step logged as null
        })
        if step % 10 == 0:
            metrics[-1]["heldout_mean_at_4"] = 0.2 + 0.01 * step
    temps = 1.0 + 0.1 * rng.integers(0, 6, size=200)
    paths = write_plots(metrics, tmp_path / "plots", temperatures=temps)
    assert [p.name for p in paths] == ["reward.png", "residuals.png", "temperature.png", "entropy.png",
                                       "temperature_hist.png"]
    for p in paths:
        assert_png(p)
    # Continuous temperatures take the binned-histogram path; one repeated value the single-bar path.
    for temps in (rng.gamma(2.0, 0.2, size=300) + 0.6, np.full(10, 1.0)):
        (hist,) = write_plots([], tmp_path / "hist", temperatures=temps)
        assert_png(hist)


def test_write_plots_skips_missing_panels(tmp_path):
    assert write_plots([], tmp_path) == []
    only_reward = [{"step": s, "reward_mean": 0.1 * s, "entropy": None} for s in range(3)]
    assert [p.name for p in write_plots(only_reward, tmp_path / "a")] == ["reward.png"]
    all_null = [{"step": s, "reward_mean": None, "frac_mixed": float("nan")} for s in range(3)]
    assert write_plots(all_null, tmp_path / "b", temperatures=np.array([np.nan])) == []
    no_steps = [{"reward_mean": 0.5}]
    assert write_plots(no_steps, tmp_path / "c", temperatures=np.array([])) == []
    with pytest.raises(ValueError, match="list of dicts"):
        write_plots([1, 2], tmp_path)


def test_ascii_histogram_counts_match_numpy(tmp_path):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(1.2, 0.1, size=500), [np.nan, np.inf]])
    text = ascii_histogram(values, bins=7, width=20)
    lines = text.splitlines()
    assert len(lines) == 8
    expected_counts, edges = np.histogram(values[np.isfinite(values)], bins=7)
    for line, count, lo, hi in zip(lines, expected_counts, edges[:-1], edges[1:]):
        m = re.fullmatch(r"\s*(\S+) - (\S+)\s*\| (#*)\s* (\d+)", line)
        assert m, line
        assert int(m.group(4)) == count
        assert float(m.group(1)) == pytest.approx(lo, rel=1e-3)
        assert float(m.group(2)) == pytest.approx(hi, rel=1e-3)
        # bars scale to the fullest bin (20 chars); a non-empty bin always shows at least one '#'
        assert len(m.group(3)) == (max(1, round(count / expected_counts.max() * 20)) if count else 0)
    assert "n=500" in lines[-1] and "2 non-finite values left out" in lines[-1]
    assert ascii_histogram([1.0, 1.0, 1.0], bins=3).splitlines()[-1].startswith("n=3")
    assert ascii_histogram([]) == "(no finite values)"
    with pytest.raises(ValueError, match="bins"):
        ascii_histogram([1.0], bins=0)


def test_running_mean_matches_a_loop():
    rng = np.random.default_rng(0)
    values = rng.random(57).tolist()
    for window in (1, 5, 20, 100):
        expect = [np.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(plots.running_mean(values, window), expect, rtol=1e-12)


def test_reward_plot_starts_at_the_heldout_score_before_rl_and_smooths_the_training_reward(tmp_path, monkeypatch):
    drawn = {}

    def capture(fig, path):
        drawn[path.stem] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                            for line in fig.axes[0].lines}
        return path

    monkeypatch.setattr(plots, "_save", capture)
    rng = np.random.default_rng(1)
    metrics = [{"step": s, "reward_mean": float(rng.random())} for s in range(1, 101)]
    for s in (50, 100):
        metrics[s - 1].update(heldout_mean_at_4=0.5 + s / 1000, heldout_pass_at_4=0.8)
    write_plots(metrics, tmp_path, heldout_before={"mean_at_4": 0.4, "pass_at_4": 0.7, "num_prompts": 200})
    reward = drawn["reward"]
    assert reward["heldout_mean_at_4"] == ([0, 50, 100], [0.4, 0.55, 0.6])
    assert reward["heldout_pass_at_4"] == ([0, 50, 100], [0.7, 0.8, 0.8])
    assert "heldout_num_prompts" not in reward  # a count, not a score
    raw = [m["reward_mean"] for m in metrics]
    assert reward["reward_mean (per step)"] == (list(range(1, 101)), raw)
    steps, smooth = reward["reward_mean (running mean of 5)"]
    assert steps == list(range(1, 101))
    np.testing.assert_allclose(smooth[10], np.mean(raw[6:11]))
    # Without a before-RL score (e.g. a resumed run's plot), the curves start at the first evaluation.
    drawn.clear()
    write_plots(metrics, tmp_path)
    assert drawn["reward"]["heldout_mean_at_4"][0] == [50, 100]


def test_heldout_verdict_line():
    from erpo_fast.run_summary import heldout_verdict

    before = {"mean_at_4": 0.398, "pass_at_4": 0.805, "mean_at_16": 0.2, "num_prompts": 200}
    after = {"mean_at_4": 0.670, "pass_at_4": 0.920, "mean_at_16": 0.1, "num_prompts": 200}
    assert heldout_verdict(before, after) == ("RL improved held-out accuracy: mean@4 0.398 -> 0.670 (+0.272), "
                                              "pass@4 0.805 -> 0.920, on 200 held-out prompts")
    assert heldout_verdict(after, before).startswith("RL lowered held-out accuracy: mean@4 0.670 -> 0.398 (-0.272)")
    assert heldout_verdict(before, {**before, "mean_at_4": 0.405}).startswith("RL did not change")
    assert heldout_verdict({}, after) is None


def test_reward_plot_ends_at_the_final_heldout_score(tmp_path, monkeypatch):
    # max_steps 90 with eval_every 50: the final evaluation (summary.json) is at step 90, not in metrics.jsonl.
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault(path.stem, {
        line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines}) and path)
    metrics = [{"step": s, "reward_mean": 0.5} for s in range(1, 91)]
    metrics[49].update(heldout_mean_at_4=0.55)
    write_plots(metrics, tmp_path, heldout_before={"mean_at_4": 0.4}, heldout_after={"mean_at_4": 0.6})
    assert drawn["reward"]["heldout_mean_at_4"] == [0, 50, 90]
    # When the last step was an evaluation step, its record already holds the final score: no second point.
    drawn.clear()
    metrics[89].update(heldout_mean_at_4=0.6)
    write_plots(metrics, tmp_path, heldout_before={"mean_at_4": 0.4}, heldout_after={"mean_at_4": 0.6})
    assert drawn["reward"]["heldout_mean_at_4"] == [0, 50, 90]
