"""Reliability and first use: builds that cannot hang, one run per output directory, verified
checkpoints with resume fallback, events, an honest CLI, progress off a terminal, custom rewards."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from erpo_fast.checkpoint import (
    CheckpointError,
    latest_intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from erpo_fast.config import ConfigError, build_config, config_from_cli, help_text
from erpo_fast.logger import Progress, RunLogger, read_metrics
from erpo_fast.rewards import RewardPool, get_reward_fn
from erpo_fast.rewards.custom import RewardSpecError
from erpo_fast.run_dir import LOCK_FILENAME, RunDirError, lock_record, prepare_output_dir, process_start_time
from erpo_fast.train import main

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2",
    "--builtin.kv_heads", "1", "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "20",
    "--builtin.task", "arithmetic", "--builtin.warm_start_problems", "2000",  # easy: a barely trained model scores
    "--builtin.warm_start_batch_size", "16", "--builtin.num_train", "64", "--builtin.num_heldout", "8",
    "--trainer.prompts_per_step", "4", "--rollout.n", "4", "--rollout.max_new_tokens", "6",
    "--trainer.eval_every", "0", "--data.reward_workers", "0", "--logging.progress", "false",
    "--trainer.threads", "1", "--trainer.lr", "1e-3", "--rollout.sync_check_every", "0",
    "--logging.plots", "false",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


@pytest.fixture
def live_process():
    """A live process on this host (not us), and its lock record."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 10
        while process_start_time(proc.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield proc, {"pid": proc.pid, "host": socket.gethostname(), "start_time": process_start_time(proc.pid)}
    finally:
        proc.kill()
        proc.wait()


def _dead_pid_record() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = {"pid": proc.pid, "host": socket.gethostname(), "start_time": process_start_time(proc.pid)}
    proc.wait()
    return record


# ----------------------------------------------------------------------------------------------------------
# 1. the first-use C++ build can never hang


def test_stale_build_lock_of_a_dead_process_is_cleared(tmp_path, caplog):
    from erpo_fast.csrc import BUILD_LOCK_NAME, TORCH_LOCK_NAME, build_lock

    (tmp_path / BUILD_LOCK_NAME).write_text(json.dumps(_dead_pid_record()))
    (tmp_path / TORCH_LOCK_NAME).write_text("")  # torch's owner-less lock, left by the killed build
    with caplog.at_level(logging.WARNING), build_lock(tmp_path, timeout_s=5.0) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not (tmp_path / TORCH_LOCK_NAME).exists()  # torch would otherwise wait on it forever
    assert not path.exists()
    assert "stale build lock" in caplog.text


def test_live_build_lock_is_waited_for_with_a_message_and_a_limit(tmp_path, capsys, live_process):
    from erpo_fast.csrc import BUILD_LOCK_NAME, BuildLockTimeout, build_lock

    proc, record = live_process
    (tmp_path / BUILD_LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(BuildLockTimeout, match=f"held by pid {proc.pid}"), build_lock(tmp_path, timeout_s=1.0):
        pass
    assert f"waiting for pid {proc.pid}" in capsys.readouterr().err
    proc.kill()
    proc.wait()
    with build_lock(tmp_path, timeout_s=5.0):  # its owner is gone now: taken over
        pass


def test_build_key_hashes_the_sources(tmp_path, monkeypatch):
    import erpo_fast.csrc as csrc

    before = csrc.cache_dir(False)
    assert csrc.source_hash(False) in before.name
    for f in Path(csrc.__file__).parent.iterdir():
        if f.suffix in (".cpp", ".h"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(csrc, "_HERE", tmp_path)
    assert csrc.cache_dir(False) == before  # same sources, same key
    (tmp_path / "sampling_common.h").write_text((tmp_path / "sampling_common.h").read_text() + "\n// edit\n")
    assert csrc.cache_dir(False) != before  # another checkout's sources never share this build


def test_build_key_names_the_environment(monkeypatch):
    # build.ninja holds torch's include/lib folders: another virtual environment must not share the build.
    import torch

    import erpo_fast.csrc as csrc

    before = csrc.cache_dir(False)
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/lib/python3/site-packages/torch/__init__.py")
    assert csrc.cache_dir(False) != before


_LOAD_FROM = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("ops", Path(sys.argv[1]) / "__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ops)
ops.load_ops()
print(ops.cache_dir())
"""


@pytest.mark.slow
def test_two_checkouts_sharing_a_cache_build_once(tmp_path):
    """Two checkouts of the same sources (same environment, one cache): the second loads the first's build. Its
    build.ninja once named each checkout's own source paths, so every first use rebuilt, silently (11-13 s)."""
    import shutil

    import erpo_fast.csrc as csrc

    here = Path(csrc.__file__).parent
    checkouts = []
    for name in ("a", "b"):
        dest = tmp_path / name / "csrc"
        shutil.copytree(here, dest, ignore=shutil.ignore_patterns("__pycache__"))
        checkouts.append(dest)
    env = {**os.environ, "ERPO_FAST_CACHE": str(tmp_path / "cache")}

    def load(checkout):
        result = subprocess.run([sys.executable, "-c", _LOAD_FROM, str(checkout)], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return Path(result.stdout.strip().splitlines()[-1]), result.stderr

    build_dir, err = load(checkouts[0])
    assert "building the sampling op" in err
    (so,) = build_dir.glob("*.so")
    built = so.stat().st_mtime_ns
    for checkout in (checkouts[1], checkouts[0]):
        again, err = load(checkout)
        assert again == build_dir and "building" not in err
        assert so.stat().st_mtime_ns == built  # not rebuilt


@pytest.mark.slow
def test_build_killed_midway_does_not_hang_the_next_process(tmp_path):
    """Kill -9 the first-use build once its lock exists; the next process must finish."""
    env = {**os.environ, "ERPO_FAST_CACHE": str(tmp_path)}
    code = "from erpo_fast.csrc import load_ops, cache_dir; load_ops(); print(cache_dir())"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("torch_extensions/*/lock")):
        assert time.monotonic() < deadline and first.poll() is None, "the build never took its lock"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the python process and its compiler children
    first.wait()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "stale build lock" in second.stderr
    assert "building the sampling op, first use" in second.stderr


# ----------------------------------------------------------------------------------------------------------
# 2./3. one run per output directory, no silent mixing of two runs


def _fake_checkpoint(out: Path, step: int) -> Path:
    def save_model(d: Path) -> None:
        (d / "weights.bin").write_bytes(os.urandom(256))

    return save_checkpoint(out, step, save_model=save_model, state={"v": step}, config={}, keep_last=3)


def test_second_live_run_into_one_directory_exits_2(tmp_path, capsys, live_process):
    _, record = live_process
    (tmp_path / LOCK_FILENAME).write_text(json.dumps(record))
    assert main([*TINY, "--output-dir", str(tmp_path), "--max-steps", "1"]) == 2
    (line,) = _error_lines(capsys)
    assert f"another run (pid {record['pid']}" in line
    assert json.loads((tmp_path / LOCK_FILENAME).read_text()) == record  # the live run's lock is untouched


def test_lock_of_a_dead_run_is_taken_over_and_released(tmp_path):
    (tmp_path / LOCK_FILENAME).write_text(json.dumps(_dead_pid_record()))
    with prepare_output_dir(tmp_path, resume=False, overwrite=False):
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_FILENAME).write_text(json.dumps({**lock_record(), "host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match="host elsewhere .*delete"):
        prepare_output_dir(tmp_path, resume=False, overwrite=False)


def test_fresh_run_over_old_checkpoints_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    _fake_checkpoint(tmp_path, 30)
    assert main([*TINY, "--output-dir", str(tmp_path), "--max-steps", "1"]) == 2
    (line,) = _error_lines(capsys)
    assert "already holds checkpoints" in line and "step 30" in line and "--overwrite" in line
    assert (tmp_path / "checkpoints" / "step_00000030").is_dir()  # nothing was touched
    with prepare_output_dir(tmp_path, resume=True, overwrite=False):
        assert (tmp_path / "checkpoints" / "step_00000030").is_dir()
    (tmp_path / "summary.json").write_text("{}")
    with prepare_output_dir(tmp_path, resume=False, overwrite=True):
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
    with pytest.raises(ConfigError, match="contradict"):
        config_from_cli(["--resume", "--overwrite"])


def test_overwrite_run_leaves_only_its_own_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "3", "--trainer.save_every", "3"]) == 0
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "2", "--trainer.save_every", "2",
                 "--overwrite", "--seed", "5"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert load_checkpoint(out / "checkpoints" / "step_00000002")["config"]["trainer"]["seed"] == 5
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert not (out / LOCK_FILENAME).exists()
    # Resuming it with another seed given on top of its own config is a one-line usage error, not a traceback.
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "3", "--resume", "--seed", "0"]) == 2
    (line,) = _error_lines(capsys)
    assert "seed" in line
    # Without --seed, --resume continues with the run's own config (seed 5).
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "3", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_output_dir_naming_a_file_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main([*TINY, "--output-dir", str(f)]) == 2
    (line,) = _error_lines(capsys)
    assert "exists and is not a directory" in line
    assert main([*TINY, "--output-dir", str(f / "below")]) == 2
    (line,) = _error_lines(capsys)
    assert "is a file" in line


# ----------------------------------------------------------------------------------------------------------
# 5. checkpoints: content hashes, resume falls back to the newest intact one


def test_same_size_corruption_is_detected(tmp_path):
    path = _fake_checkpoint(tmp_path, 1)
    load_checkpoint(path)
    weights = path / "model" / "weights.bin"
    blob = bytearray(weights.read_bytes())
    blob[100] ^= 0xFF  # one flipped byte: same size
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"model/weights.bin: its content does not match the SHA-256"):
        load_checkpoint(path)


def test_resume_falls_back_to_newest_intact_checkpoint(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 1)
    good = _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 3)
    state = bad / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-7])  # truncated
    with caplog.at_level(logging.WARNING, logger="erpo_fast"):
        assert latest_intact_checkpoint(tmp_path) == good
    assert "skipping checkpoint step_00000003" in caplog.text and "trainer_state.pt" in caplog.text


def test_resume_run_skips_a_corrupted_newest_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    args = [*TINY, "--output-dir", str(out), "--trainer.save_every", "2", "--trainer.keep_last", "3"]
    assert main([*args, "--max-steps", "4"]) == 0
    full = read_metrics(out)
    weights = next((out / "checkpoints" / "step_00000004" / "model").glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0x55  # same-size corruption inside the tensor data
    weights.write_bytes(bytes(blob))
    with caplog.at_level(logging.INFO, logger="erpo_fast"):
        assert main([*args, "--max-steps", "4", "--resume"]) == 0
    assert "skipping checkpoint step_00000004" in caplog.text
    assert "step_00000002 (step 2)" in caplog.text  # resumed from the intact one
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    timing = ("time_", "tokens_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(timing)} for r in rs]  # noqa: E731
    assert strip(again) == strip(full)  # steps 3-4 redone from step 2 reproduce the first run


# ----------------------------------------------------------------------------------------------------------
# 4. events.jsonl: timeouts (with prompt id and who was slow), errors, skipped steps, stops


SLOW_GOLD_VERIFIER = """
import time

def verify(response, answer):
    if response == "hang":
        time.sleep(60)
    if response == "raise":
        raise RuntimeError("verifier bug")
    return float(response == answer)

def _prepare(answer):
    if answer == "slow":
        time.sleep(60)

verify.prepare_answer = _prepare
"""


def test_timeouts_name_the_prompt_and_blame_gold_or_response(tmp_path):
    # Gold "slow" hangs in the gold stage (prepare_answer), response "hang" in the response stage.
    (tmp_path / "slow_gold.py").write_text(SLOW_GOLD_VERIFIER)
    slow_gold_verifier = get_reward_fn(f"{tmp_path / 'slow_gold.py'}:verify")
    events = []
    pairs = [("1", "1"), ("a", "slow"), ("hang", "2"), ("b", "slow"), ("raise", "3"), ("c", "slow"), ("2", "2")]
    keys = ["p1", "pslow", "p2", "pslow", "p3", "pslow", "p2"]
    with RewardPool(slow_gold_verifier, num_workers=1, timeout_s=1.0) as pool:
        pool.on_event = lambda kind, message, **fields: events.append({"kind": kind, "message": message, **fields})
        started = time.monotonic()
        assert pool.score(pairs, keys=keys) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        # One timeout for the slow gold answer, one for the hung response; the other two responses to the
        # slow gold answer are not run again (they would cost a timeout each).
        assert time.monotonic() - started < 30
        stats = pool.last_stats
        assert (stats.num_timeouts, stats.num_errors) == (4, 1)
    timeouts = {(e["prompt_id"], e["index"]): e for e in events if e["kind"] == "verifier_timeout"}
    assert timeouts[("p2", 2)]["slow"] == "response" and timeouts[("p2", 2)]["response"] == "'hang'"
    assert {timeouts[("pslow", i)]["slow"] for i in (1, 3, 5)} == {"gold"}
    assert sum(bool(timeouts[("pslow", i)].get("known_slow_gold")) for i in (1, 3, 5)) == 2
    assert "the gold answer" in timeouts[("pslow", 1)]["message"]
    (error,) = [e for e in events if e["kind"] == "verifier_error"]
    assert error["prompt_id"] == "p3" and "RuntimeError: verifier bug" in error["error"]


def test_math_and_arithmetic_have_a_gold_stage():
    # So that a slow gold answer is blamed on the gold answer, not on the response.
    assert get_reward_fn("arithmetic").prepare_answer("12") == "12"
    get_reward_fn("math").prepare_answer("\\frac{1}{2}")


def _custom_reward_file(tmp_path: Path) -> Path:
    """Hangs on responses ending in 1, raises on those ending in 2."""
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent("""
        import time

        def score(response, answer):
            if response.endswith("1"):
                time.sleep(60)
            if response.endswith("2"):
                raise ValueError("cannot read " + repr(response))
            return 1.0 if response.strip().endswith(answer) else 0.0
    """))
    return path


def _once_reward_file(tmp_path: Path) -> Path:
    """The first call of the run hangs, the next one raises (whatever the model samples)."""
    path = tmp_path / "once_reward.py"
    path.write_text(textwrap.dedent(f"""
        import os
        import time

        def _first(name):
            try:
                os.close(os.open(os.path.join({str(tmp_path)!r}, name), os.O_CREAT | os.O_EXCL))
                return True
            except FileExistsError:
                return False

        def score(response, answer):
            if _first("hung"):
                time.sleep(60)
            if _first("raised"):
                raise ValueError("cannot read " + repr(response))
            return 1.0 if response.strip().endswith(answer) else 0.0
    """))
    return path


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_run_with_a_custom_reward_that_raises_and_hangs_logs_events(tmp_path):
    out = tmp_path / "run"
    spec = f"{_once_reward_file(tmp_path)}:score"
    args = list(TINY)
    args[args.index("--data.reward_workers") + 1] = "2"
    assert main([*args, "--output-dir", str(out), "--max-steps", "2", "--data.reward", spec,
                 "--data.reward_timeout_s", "1"]) == 0
    events = _events(out)
    metrics = read_metrics(out)
    timeouts = [e for e in events if e["kind"] == "verifier_timeout"]
    errors = [e for e in events if e["kind"] == "verifier_error"]
    assert len(timeouts) == sum(r["reward_timeouts"] for r in metrics) > 0
    assert len(errors) == sum(r["reward_errors"] for r in metrics) > 0
    assert all(e["slow"] == "unknown" and e["prompt_id"] for e in timeouts)  # no gold stage: no blame
    assert all("ValueError: cannot read" in e["error"] and e["prompt_id"] for e in errors)
    assert all(e["step"] in (1, 2) for e in timeouts + errors)


def test_divergence_stop_is_an_event(tmp_path, capsys):
    out = tmp_path / "run"
    # An absurd learning rate without clipping: the policy diverges and the run stops (exit 1).
    code = main([*TINY, "--output-dir", str(out), "--max-steps", "8", "--trainer.lr", "1e30",
                 "--trainer.grad_clip", "0", "--trainer.nan_patience", "1", "--trainer.prompts_per_step", "16"])
    assert code == 1
    assert "stopped:" in capsys.readouterr().err
    (stop,) = [e for e in _events(out) if e["kind"] == "stopped"]
    assert "non-finite" in stop["message"]


def test_skipped_step_is_an_event(tmp_path, caplog):
    out = tmp_path / "run"
    # Untrained model, exact answers: every group is all-wrong, dynamic sampling drops them all.
    assert main([*TINY, "--output-dir", str(out), "--max-steps", "1", "--builtin.warm_start_steps", "0",
                 "--algorithm.dynamic_sampling", "true", "--algorithm.max_refill_rounds", "0"]) == 0
    (record,) = read_metrics(out)
    assert record["sequences_trained"] == 0
    assert [e["kind"] for e in _events(out)] == ["skipped_step"]
    (shown,) = [r.getMessage() for r in caplog.records if "[skipped_step]" in r.getMessage()]
    assert shown.startswith("[skipped_step] step 1: no group left") and shown.count("step 1") == 1, shown


# ----------------------------------------------------------------------------------------------------------
# 6. an honest CLI


def test_help_shows_effective_values(capsys):
    def knob_line(argv, knob):
        assert main([*argv, "--help"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(knob + " "))

    assert knob_line([], "--trainer.lr").startswith("  --trainer.lr 0.0001, default 1e-06")  # tiny-cpu applies
    assert knob_line(["--model", "/m"], "--trainer.lr").startswith("  --trainer.lr 1e-06:")  # a real model: not
    assert knob_line(["--trainer.lr", "3e-4"], "--trainer.lr").startswith("  --trainer.lr 0.0003,")
    assert knob_line([], "--trainer.output_dir").startswith("  --trainer.output_dir 'runs/tiny-cpu'")
    assert "preset: none (--model/--data given" in help_text(["--data", "d.jsonl"])


def test_builtin_preset_does_not_touch_a_real_run(tmp_path):
    for argv in (["--model", "/m"], ["--data", "d.jsonl"]):
        cfg = config_from_cli(argv)
        assert (cfg.trainer.lr, cfg.trainer.output_dir, cfg.rollout.max_new_tokens) == (1e-6, "runs/erpo", 512)
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  path: /m\n")
    assert build_config(yaml_path=y).trainer.lr == 1e-6
    assert config_from_cli(["--model", "/m", "--preset", "tiny-cpu"]).trainer.lr == 1e-4  # asked for
    assert config_from_cli([]).trainer.lr == 1e-4  # the built-in job keeps its preset


@pytest.mark.parametrize("argv, message", [
    (["--trainer.lr", "--seed", "3"], "option --trainer.lr needs a value"),
    (["--output-dir", "--resume"], "option --output-dir needs a value"),
    (["--data.reward", "nonsense"], "module:function"),
])
def test_missing_value_is_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_from_cli(argv)


def test_yaml_syntax_error_has_a_line_number(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trainer:\n  lr: 1e-4\n  max_steps: [3\nrollout:\n  n: 4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+") as exc:
        build_config(yaml_path=y)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------------------
# 7. progress you can see


def test_progress_off_a_terminal_is_plain_lines_every_k_steps(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=7, progress=True, progress_every=3) as logger:
        for step in range(1, 8):
            logger.set_phase("rollout")
            logger.set_phase("learn")
            logger.log_step({"step": step, "reward_mean": 0.25})
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1/7", "3/7", "6/7", "7/7"]  # first, every 3rd, last
    assert all("reward=0.250" in line and "rollout" in line and "learn" in line for line in lines)


def test_warm_start_shows_progress(capsys):
    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.tokenizer import build_char_tokenizer
    from erpo_fast.warm_start import supervised_finetune

    tok = build_char_tokenizer()
    cfg = BuiltinConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)
    model = build_tiny_qwen2(tok, cfg, seed=0)
    examples = [([5, 6, 7], [8, 9, tok.eos_token_id])] * 4
    supervised_finetune(model, examples, steps=20, lr=1e-3, batch_size=2, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "warm start: 2/20" in err and "warm start: 20/20" in err and "loss" in err
    with Progress(5, "quiet", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""


def test_transformers_bars_are_silenced(tmp_path, capfd):
    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2, load_model
    from erpo_fast.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, BuiltinConfig(hidden_size=16, layers=1, heads=2, kv_heads=1,
                                              intermediate_size=32), seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    load_model(tmp_path, dtype="float32", device="cpu")
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err


# ----------------------------------------------------------------------------------------------------------
# 8. custom rewards


@pytest.mark.parametrize("spec", ["erpo_fast.rewards.example_reward:exact_match",
                                  str(ROOT / "erpo_fast" / "rewards" / "example_reward.py") + ":exact_match",
                                  "erpo_fast/rewards/example_reward.py:exact_match"])  # the README's example
def test_custom_reward_spec_runs_in_the_worker_pool(spec, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    fn = get_reward_fn(spec)
    monkeypatch.chdir(tmp_path)  # workers load a relative file spec by its absolute path
    pairs = [("The answer is 42.", "42"), ("so: answer: Paris", "paris"), ("no idea", "3")]
    with RewardPool(fn, num_workers=1, timeout_s=30.0) as pool:
        assert pool.score(pairs) == [1.0, 1.0, 0.0]
        assert pool.last_stats.num_errors == 0
    assert pool.has_gold_stage  # the example declares its gold-only stage


def test_custom_reward_that_raises_or_hangs_scores_zero(tmp_path):
    fn = get_reward_fn(f"{_custom_reward_file(tmp_path)}:score")
    with RewardPool(fn, num_workers=1, timeout_s=1.0) as pool:
        assert pool.score([("x 7", "7"), ("x 1", "1"), ("x 2", "2"), ("x 3", "3")]) == [1.0, 0.0, 0.0, 1.0]
        assert (pool.last_stats.num_timeouts, pool.last_stats.num_errors) == (1, 1)
        kinds = sorted(i["kind"] for i in pool.last_stats.incidents)
        assert kinds == ["verifier_error", "verifier_timeout"]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("erpo_fast.rewards.example_reward:nope", "has no attribute 'nope'"),
    ("/nonexistent/reward.py:fn", "file not found"),
    ("erpo_fast.rewards.example_reward:_FINAL", "not a function"),
    ("erpo_fast.rewards.example_reward:normalised_gold", "must accept \\(response, answer\\)"),
])
def test_bad_custom_reward_spec_is_one_line_exit_2(tmp_path, capsys, spec, message):
    with pytest.raises(RewardSpecError, match=message):
        get_reward_fn(spec)
    out = tmp_path / "run"
    assert main([*TINY, "--output-dir", str(out), "--data.reward", spec]) == 2
    (line,) = _error_lines(capsys)
    assert spec in line
    assert not out.exists()  # failed before touching anything, and before the warm start


def test_file_reward_with_a_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def score(response, answer):\n    return (\n")
    with pytest.raises(RewardSpecError, match="importing .*bad.py failed: SyntaxError") as exc:
        get_reward_fn(f"{bad}:score")
    assert "\n" not in str(exc.value)


def test_custom_reward_is_picklable_by_spec():
    import pickle

    fn = get_reward_fn("erpo_fast.rewards.example_reward:exact_match")
    again = pickle.loads(pickle.dumps(fn))
    assert again("answer is 5", "5") == 1.0 and again.spec == fn.spec
