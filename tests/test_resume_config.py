"""`--resume --output-dir D` alone continues the run in D with the config it was started with (its checkpoint's
config.yaml): a user's --model/--data run, resumed without repeating them, logs what the uninterrupted run logs,
and never builds the built-in model it does not use. Flags given on top override; one that breaks exactness is a
one-line usage error. Run the way a user runs it: the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from erpo_fast.logger import read_metrics

TIMING = ("time_", "tokens_per_s")


def _setup(tmp_path):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(5)))
    # A user's run: not the defaults anywhere it matters for the metrics.
    return ["--model", str(model), "--data", str(data), "--data.heldout_path", str(data), "--data.reward",
            "arithmetic", "--data.reward_workers", "0", "--rollout.max_new_tokens", "4", "--rollout.n", "4",
            "--trainer.prompts_per_step", "4", "--trainer.lr", "1e-2", "--trainer.eval_every", "2",
            "--trainer.eval_k", "2", "--trainer.save_every", "1", "--trainer.keep_last", "10", "--trainer.threads", "1",
            "--algorithm.temperature_step", "0.3", "--logging.plots", "false"]


def _cli(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ERPO_FAST_CACHE"] = str(tmp_path / "empty-cache")  # nothing cached: a warm start would show here
    return subprocess.run([sys.executable, "-m", "erpo_fast.train", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # each run takes seconds; a warm start of the unused built-in model, minutes


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def test_resume_with_only_the_output_dir_continues_the_run_exactly(tmp_path):
    run = _setup(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _cli(tmp_path, *run, "--max-steps", "4", "--output-dir", str(full)).returncode == 0
    first = _cli(tmp_path, *run, "--max-steps", "4", "--output-dir", str(part))
    assert first.returncode == 0
    # cut the run short after step 2, as a crash would: its checkpoints 3 and 4 and their records go
    import shutil

    for step in (3, 4):
        shutil.rmtree(part / "checkpoints" / f"step_{step:08d}")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    resumed = _cli(tmp_path, "--resume", "--output-dir", str(part))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _comparable(read_metrics(part)) == _comparable(read_metrics(full))
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.safetensors"))


def test_resume_overrides_on_top_and_exactness_breaking_ones_are_one_line_errors(tmp_path):
    run = _setup(tmp_path)
    out = tmp_path / "run"
    assert _cli(tmp_path, *run, "--max-steps", "2", "--output-dir", str(out)).returncode == 0
    longer = _cli(tmp_path, "--resume", "--output-dir", str(out), "--max-steps", "3")  # a flag on top
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    bad = _cli(tmp_path, "--resume", "--output-dir", str(out), "--max-steps", "4", "--seed", "5")
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "seed" in errors[0], bad.stderr[-2000:]
