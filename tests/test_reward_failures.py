"""A reward function that fails: occasionally (score 0, logged, the run goes on) or on every response of a step
(the run stops at once, exit 1, one line naming the function and its first error, checkpoints kept). Run the way
a user runs it: the CLI in a subprocess, a custom verifier given as path/file.py:function."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from erpo_fast.checkpoint import checkpoint_steps
from erpo_fast.logger import read_metrics

VERIFIER = '''
import os

calls = 0


def flaky(response, answer):
    """Fails on every 5th call (returns None), and on every call after BREAK_AFTER calls."""
    global calls
    calls += 1
    if calls > int(os.environ.get("BREAK_AFTER", "1000000000")) or calls % 5 == 0:
        return None
    return float(response.strip() == answer)
'''

TINY = ["--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2",
        "--builtin.kv_heads", "1", "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "0",
        "--builtin.task", "arithmetic", "--builtin.num_train", "64", "--builtin.num_heldout", "8",
        "--trainer.prompts_per_step", "4", "--rollout.n", "4", "--rollout.max_new_tokens", "6",
        "--data.reward_workers", "0", "--logging.plots", "false", "--trainer.threads", "1",
        "--trainer.save_every", "1"]


def _run(tmp_path, *args, break_after=None, cli="erpo_fast.train"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ERPO_FAST_CACHE"] = str(tmp_path / "cache")
    if break_after is not None:
        env["BREAK_AFTER"] = str(break_after)
    return subprocess.run([sys.executable, "-m", cli, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _verifier(tmp_path):
    path = tmp_path / "my_verifier.py"
    path.write_text(VERIFIER)
    return f"{path}:flaky"


def test_a_step_where_every_response_fails_stops_the_run(tmp_path):
    spec, out = _verifier(tmp_path), tmp_path / "run"
    # 16 responses a step, no held-out evaluation: steps 1-2 fail now and then, step 3 on every response.
    result = _run(tmp_path, *TINY, "--trainer.eval_every", "0", "--max-steps", "6", "--data.reward", spec,
                  "--output-dir", str(out), break_after=32)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("erpo_fast.train: stopped: step 3: the reward function "), last
    assert spec in last and "16 of 16" in last and "NoneType" in last, last  # the function and its first error
    assert checkpoint_steps(out) == [1, 2]  # the last checkpoint is kept
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["reward_errors"] for r in records] == [3, 3]  # calls 5, 10, 15 and 20, 25, 30: scored 0, logged
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "verifier_error" for e in events) == 3 + 3 + 16  # every failure is in events.jsonl
    assert events[-1]["kind"] == "stopped"
    # ... but the terminal shows at most 3 per batch and one line counting the rest
    shown = [line for line in result.stderr.splitlines() if "[verifier_error]" in line]
    assert len(shown) == 3 + 3 + 3, len(shown)
    assert sum("13 more verification failures in this batch of 16" in line for line in result.stderr.splitlines()) == 1


def test_occasional_failures_score_zero_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    result = _run(tmp_path, *TINY, "--trainer.eval_every", "2", "--max-steps", "2", "--data.reward",
                  _verifier(tmp_path), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(r["reward_errors"] for r in read_metrics(out)) > 0


def test_heldout_evaluation_where_every_response_fails_stops_the_run(tmp_path):
    out = tmp_path / "run"
    result = _run(tmp_path, *TINY, "--trainer.eval_every", "2", "--max-steps", "2", "--data.reward",
                  _verifier(tmp_path), "--output-dir", str(out), break_after=0)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "held-out evaluation: the reward function" in last and "32 of 32" in last, last
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out)  # stopped before step 1
