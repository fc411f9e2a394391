"""--trainer.profile_steps: a real training run on CPU writes a loadable Chrome trace of exactly the asked
steps, with the phases marked, and prints the phase table and the top operators."""

import json

import pytest

from erpo_fast.config import ConfigError
from erpo_fast.profiling import PHASES, parse_profile_steps
from erpo_fast.train import main

TINY = [
    "--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2",
    "--builtin.kv_heads", "1", "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "5",
    "--builtin.task", "arithmetic", "--builtin.warm_start_problems", "2000",  # easy: a barely trained model scores
    "--builtin.warm_start_batch_size", "8", "--builtin.num_train", "32", "--builtin.num_heldout", "8",
    "--trainer.prompts_per_step", "4", "--rollout.n", "2", "--rollout.max_new_tokens", "4",
    "--trainer.eval_every", "0", "--data.reward_workers", "0", "--logging.progress", "false",
    "--logging.plots", "false", "--trainer.threads", "1",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_parse_profile_steps():
    assert parse_profile_steps(None) is None
    assert parse_profile_steps("") is None
    assert parse_profile_steps("2:5") == (2, 5)
    assert parse_profile_steps(" 3 ") == (3, 3)
    assert parse_profile_steps("4:4", max_steps=4) == (4, 4)
    for bad in ("a:b", "1:2:3", "2-5", "0:3", "5:2", "-1:2"):
        with pytest.raises(ConfigError, match="profile_steps"):
            parse_profile_steps(bad)
    with pytest.raises(ConfigError, match="max_steps=4"):
        parse_profile_steps("3:5", max_steps=4)


def test_profile_steps_writes_trace_and_prints_tables(tmp_path, capsys):
    assert main([*TINY, "--output-dir", str(tmp_path), "--max-steps", "3", "--trainer.profile_steps", "2:3"]) == 0
    err = capsys.readouterr().err
    trace = tmp_path / "profile" / "trace_steps_2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # Exactly steps 2 and 3 were recorded, with every phase marked inside them.
    assert {"erpo/step_2", "erpo/step_3"} <= names and "erpo/step_1" not in names
    assert {f"erpo/{phase}" for phase in PHASES} <= names
    assert "aten::mm" in names  # operators, not only our ranges
    assert "=== profile of steps 2..3 (2 step(s), cpu) ===" in err
    table = err.split("=== profile of steps 2..3")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:8]}
    assert set(rows) == {*PHASES, "other", "step"}
    assert float(rows["learn"][0]) > 0 and float(rows["rollout"][0]) > 0
    assert sum(float(rows[p][0]) for p in (*PHASES, "other")) == pytest.approx(float(rows["step"][0]), abs=2e-3)
    assert "top 15 operators by self CPU time" in err and "aten::" in table
    assert "erpo/learn" not in table.split("operators by self CPU time")[1]
    assert (tmp_path / "profile" / "summary_steps_2-3.txt").read_text().startswith("=== profile of steps 2..3")


def test_profile_steps_bad_value_is_a_usage_error(tmp_path, capsys):
    assert main([*TINY, "--output-dir", str(tmp_path), "--max-steps", "2", "--trainer.profile_steps", "2:3"]) == 2
    assert "profile_steps '2:3' ends after trainer.max_steps=2" in capsys.readouterr().err
    assert not (tmp_path / "profile").exists()


def test_profile_range_before_a_resumed_start_warns(tmp_path, caplog):
    from types import SimpleNamespace

    from erpo_fast.profiling import StepProfiler

    with caplog.at_level("WARNING", logger="erpo_fast"):
        StepProfiler("2:3", tmp_path).attach(SimpleNamespace(start_step=3))
    assert "nothing will be profiled" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="erpo_fast"):
        StepProfiler("2:4", tmp_path).attach(SimpleNamespace(start_step=3))
    assert "nothing will be profiled" not in caplog.text
