"""trainer.async_steps: the rollout process samples batch t+K from the weights exactly K updates old.

Whole runs of the tiny built-in setup (`python -m erpo_fast.train`'s `main`, or a subprocess where a signal is
sent), plus the pieces: the weight slots across processes, the version schedule, the batch split across ranks.
"""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TIMING, TINY, _comparable  # the tiny built-in setup of the end-to-end tests

from erpo_fast.batch import RolloutSequence, StepBatch
from erpo_fast.distributed import free_port
from erpo_fast.logger import read_metrics
from erpo_fast.train import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(out, *extra):
    return main([*TINY, "--output-dir", str(out), *extra])


# ---- pieces ------------------------------------------------------------------------------------------------

def _read_slot(slots, version, out):
    # Plain lists back: a tensor put on a queue is shared through this process, which exits right after.
    out.put({name: t.tolist() for name, t in slots.views(version).items()})


def test_weight_slots_reach_another_process_through_shared_memory():
    import torch.multiprocessing as mp

    from erpo_fast.weight_transport import WeightSlots

    named = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7), "c": torch.randn(2, 2, 3)}
    slots = WeightSlots.like(named.items(), num_slots=2, dtype=torch.float32, device=torch.device("cpu"))
    assert slots.write(4, named.items()) == slots.nbytes  # version 4 -> slot 0
    slots.write(5, {k: -v for k, v in named.items()}.items())  # version 5 -> slot 1
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    for version, sign in ((4, 1), (5, -1)):
        p = ctx.Process(target=_read_slot, args=(slots, version, q))
        p.start()
        got = q.get(timeout=60)
        p.join()
        for name, t in named.items():
            torch.testing.assert_close(torch.tensor(got[name]), sign * t, rtol=0, atol=0)
    # Written after the process got the buffers: it still sees the new values (shared, not copied).
    slots.write(6, {k: v + 1 for k, v in named.items()}.items())
    p = ctx.Process(target=_read_slot, args=(slots, 6, q))
    p.start()
    got = q.get(timeout=60)
    p.join()
    torch.testing.assert_close(torch.tensor(got["c"]), named["c"] + 1, rtol=0, atol=0)
    with pytest.raises(KeyError, match="missing"):
        slots.write(7, [("a.weight", named["a.weight"])])


def test_every_batch_is_sampled_exactly_k_updates_behind():
    from erpo_fast.rollout_worker import batch_version

    assert [batch_version(b, 1, 0) for b in range(1, 7)] == [0, 0, 1, 2, 3, 4]
    assert [batch_version(b, 2, 0) for b in range(1, 7)] == [0, 0, 0, 1, 2, 3]
    # Resumed at step 3 with batches 4 and 5 (K=2) restored from the checkpoint: batch 6 comes from version 3.
    assert [batch_version(b, 2, 3) for b in range(6, 9)] == [3, 4, 5]


def test_rollout_state_travels_with_the_last_batch_in_flight_at_each_checkpoint():
    from erpo_fast.config import build_config
    from erpo_fast.rollout_worker import state_wanted

    cfg = build_config("none", overrides={"trainer.async_steps": 2, "trainer.save_every": 3,
                                          "trainer.max_steps": 7})
    assert [b for b in range(1, 8) if state_wanted(cfg, b)] == [5, 7]  # after step 3: 4, 5; step 6: 7; end: 7


def _seq(i, n=3):
    return RolloutSequence(prompt_ids=[1, 2], response_ids=[3] * n, rollout_logprobs=[-0.5] * n, temperature=1.0,
                           advantage=float(i), seq_key=i)


def test_split_batch_deals_whole_groups_contiguously_and_rekeys():
    from erpo_fast.async_rollout import split_batch

    batch = StepBatch([_seq(i) for i in range(6)], {"reward_mean": 0.5}, global_sequences=6,
                      global_response_tokens=18)
    parts = split_batch(batch, 2, group_size=2)  # 3 groups of 2 over 2 ranks: 1 group, then 2
    assert [[s.advantage for s in p.sequences] for p in parts] == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]
    assert [[s.seq_key for s in p.sequences] for p in parts] == [[0, 1], [0, 1, 2, 3]]
    assert all(p.global_sequences == 6 and p.global_response_tokens == 18 for p in parts)
    assert split_batch(batch, 1, group_size=2) == [batch]


def test_is_level_auto_turns_the_correction_on_for_async_only():
    from erpo_fast.config import build_config

    assert build_config("none").algorithm.is_level == "none"
    assert build_config("none", overrides={"trainer.async_steps": 1}).algorithm.is_level == "token"
    assert build_config("none", overrides={"trainer.async_steps": 1,
                                           "algorithm.is_level": "sequence"}).algorithm.is_level == "sequence"


def test_rollout_device_on_a_cuda_node_without_a_spare_gpu_is_a_usage_error(monkeypatch):
    from erpo_fast.async_rollout import rollout_device
    from erpo_fast.config import ConfigError, build_config
    from erpo_fast.distributed import Runtime

    cfg = build_config("none", overrides={"trainer.async_steps": 1})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rt = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="needs a GPU for the rollout process"):
        rollout_device(cfg, rt)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert rollout_device(cfg, rt) == torch.device("cuda", 1)
    cfg.rollout.device = "tpu:banana"
    with pytest.raises(ConfigError, match="rollout.device"):
        rollout_device(cfg, rt)


def test_memory_plan_counts_the_rollout_process_beside_the_learner():
    from erpo_fast.config import build_config
    from erpo_fast.memory_plan import ModelShape, plan_memory

    shape = ModelShape(params=10_000_000, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                       intermediate=768, vocab=1000, tied=True)
    sync = plan_memory(build_config("none"), shape, device=torch.device("cpu"))
    cfg = build_config("none", overrides={"trainer.async_steps": 2})
    plan = plan_memory(cfg, shape, device=torch.device("cpu"))
    assert plan.terms["async weight slots (2 x engine dtype, shared)"] == 2 * 4 * shape.params
    assert plan.terms["engine weights"] == 4 * shape.params  # no sharing across processes
    assert list(plan.phases) == ["async (rollout and learning at once)"]
    # Both phases at once: more than the larger of the synchronous ones by the engine, the slots, a runtime.
    assert plan.peak > max(sync.phases.values()) + 2 * 4 * shape.params


# ---- whole runs --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_async_run_is_reproducible_and_logs_its_policy_versions(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    reward = tmp_path / "parity_reward.py"  # mixed groups, so the learner runs sequences and measures IS weights
    reward.write_text("def score(response, answer):\n    return float(len(response) % 2)\n")
    assert _run(a, "--max-steps", "4", "--trainer.async_steps", "1", "--data.reward", f"{reward}:score") == 0
    assert _run(b, "--max-steps", "4", "--trainer.async_steps", "1", "--data.reward", f"{reward}:score") == 0
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    assert _comparable(ra) == _comparable(rb)
    assert [r["policy_version"] for r in ra] == [0, 0, 1, 2]
    assert [r["staleness"] for r in ra] == [0, 1, 1, 1]
    # the truncated IS correction is on by default (measured on the sequences the learner ran)
    ran = [r for r in ra if r["zero_adv_skipped"] < r["sequences_trained"]]
    assert ran and all("is_weight_mean" in r for r in ran)
    assert "heldout_mean_at_2" in ra[1]
    summary = json.loads((a / "summary.json").read_text())
    assert summary["heldout_after"] == json.loads((b / "summary.json").read_text())["heldout_after"]


@pytest.mark.slow
@pytest.mark.parametrize("k", [2])
def test_async_resume_from_a_checkpoint_with_batches_in_flight_is_exact(tmp_path, k):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(full, "--max-steps", "6", "--trainer.async_steps", str(k)) == 0
    # A run killed after step 4 or 5 has step 3's checkpoint (batches 4..3+K sampled and saved with it).
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    assert main(["--output-dir", str(part), "--resume"]) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert _comparable(a) == _comparable(b)
    assert [r["policy_version"] for r in a] == [max(s - 1 - k, 0) for s in range(1, 7)]
    assert json.loads((full / "summary.json").read_text())["heldout_after"] == \
        json.loads((part / "summary.json").read_text())["heldout_after"]


@pytest.mark.slow
def test_resuming_an_async_checkpoint_synchronously_is_a_one_line_error(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "4", "--trainer.async_steps", "1") == 0
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path), "--resume", "--trainer.async_steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("erpo_fast.train: error:") and "in-flight batches" in err[-1]


def _logprobs64(model, state, seq):
    """float64 reference: log-probs of seq's response tokens at its temperature under ``state``."""
    model.load_state_dict(state)
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    p, r = len(seq.prompt_ids), len(seq.response_ids)
    lp = torch.log_softmax(logits[p - 1:p - 1 + r] / seq.temperature, dim=-1)
    return lp.gather(1, torch.tensor(seq.response_ids)[:, None])[:, 0]


@pytest.mark.slow
def test_importance_ratio_is_to_the_stale_rollout_policy(tmp_path, monkeypatch):
    """Planted check: batch t's rollout log-probs are those of the weights the learner had two steps earlier
    (K=1: version t-2), not of its current ones, and the IS weight the loss used is min(exp(current - rollout), C)
    with the current weights (float64 references on the learner's own model)."""
    from erpo_fast.learner import Learner

    seen = []  # per step: (sequences, the learner's weights at the start of the step, metrics)
    train_on = Learner.train_on

    def spy(self, batch):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        out = train_on(self, batch)
        seen.append((list(batch.sequences), state, out, self.model))
        return out

    monkeypatch.setattr(Learner, "train_on", spy)
    reward = tmp_path / "parity_reward.py"  # mixed groups at every step, so every update moves the weights
    reward.write_text("def score(response, answer):\n    return float(len(response) % 2)\n")
    assert _run(tmp_path / "run", "--max-steps", "4", "--trainer.async_steps", "1", "--algorithm.is_clip", "1.05",
                "--trainer.eval_every", "0", "--data.reward", f"{reward}:score") == 0
    model = copy.deepcopy(seen[0][3]).double().eval()
    for t in (2, 3, 4):  # batch t comes from version t-2: the learner's weights at the start of step t-1
        seqs, current, metrics, _ = seen[t - 1]
        stale = {k: v.double() for k, v in seen[t - 2][1].items()}
        current = {k: v.double() for k, v in current.items()}
        rollout = torch.cat([torch.tensor(s.rollout_logprobs, dtype=torch.float64) for s in seqs])
        under_stale = torch.cat([_logprobs64(model, stale, s) for s in seqs])
        under_current = torch.cat([_logprobs64(model, current, s) for s in seqs])
        torch.testing.assert_close(rollout, under_stale, rtol=0, atol=2e-4)
        assert (rollout - under_current).abs().max() > 1e-2, "the planted staleness must be visible"
        # the metrics cover the sequences the learner ran (trainer.skip_zero_advantage): a non-zero advantage
        ran = torch.cat([torch.full((len(s.response_ids),), s.advantage != 0.0) for s in seqs])
        assert ran.any()
        d = (under_current - rollout)[ran]
        assert metrics["is_weight_mean"] == pytest.approx(torch.exp(d).clamp(max=1.05).mean().item(), abs=2e-4)
        assert metrics["mismatch_logp_abs_mean"] == pytest.approx(d.abs().mean().item(), abs=2e-4)


@pytest.mark.slow
def test_dynamic_sampling_refills_in_the_rollout_process(tmp_path):
    reward = tmp_path / "half.py"  # about half the groups uniform: DAPO drops them and refills
    reward.write_text("import zlib\ndef score(response, answer):\n"
                      "    return float(zlib.crc32(response[:1].encode()) & 1)\n")
    assert _run(tmp_path / "run", "--max-steps", "3", "--trainer.async_steps", "1", "--data.reward",
                f"{reward}:score", "--algorithm.dynamic_sampling", "true", "--algorithm.max_refill_rounds", "3") == 0
    records = read_metrics(tmp_path / "run")
    assert sum(r["rollout_rounds"] for r in records) > 3 and sum(r["groups_dropped"] for r in records) > 0
    assert all(r["sequences_trained"] <= 16 for r in records)


WHERE = """import json, os
def score(response, answer):  # where the rollout process and its parent, the learner, may run
    with open({path!r}, "a") as f:
        f.write(json.dumps([sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(os.getppid()))]) + "\\n")
    return 1.0
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("pin", [True, False])
def test_async_on_cpu_pins_the_learner_and_the_rollout_process_to_cores_of_their_own(tmp_path, pin):
    seen, reward = tmp_path / "seen.jsonl", tmp_path / "where.py"
    reward.write_text(WHERE.format(path=str(seen)))  # data.reward_workers 0: scored in the rollout process
    before = os.sched_getaffinity(0)
    assert _run(tmp_path / "run", "--max-steps", "2", "--trainer.async_steps", "1", "--data.reward", f"{reward}:score",
                "--rollout.pin_cpus", str(pin).lower()) == 0
    cores = sorted(before)
    expected = [[cores[1]], [cores[0]]] if pin else [cores, cores]  # [rollout process, learner]
    assert {json.dumps(json.loads(line)) for line in seen.read_text().splitlines()} == {json.dumps(expected)}
    assert os.sched_getaffinity(0) == before  # the learner's cores back after the run


@pytest.mark.slow
def test_an_error_in_the_rollout_process_stops_the_run_with_its_own_message(tmp_path, capsys):
    reward = tmp_path / "broken.py"
    reward.write_text("def score(response, answer):\n    raise ValueError('no verifier today')\n")
    assert _run(tmp_path / "run", "--max-steps", "3", "--trainer.async_steps", "1", "--data.reward",
                f"{reward}:score") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("erpo_fast.train: stopped:") and "no verifier today" in last


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rollout_pid(pid):
    for child in _children(pid):
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    return None


def _start(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "erpo_fast.train", *TINY, "--output-dir", str(out),
                             "--max-steps", "400", "--trainer.save_every", "2", "--trainer.eval_every", "0",
                             "--trainer.async_steps", "1", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_steps(proc, out, steps, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not reach its steps in time")


def _signal_mid_run(out, send, timeout=120):
    """Start an async run, and once it has logged 3 steps call ``send(learner, rollout_pid)``; wait for the learner
    to end. Returns (its exit code, its stderr, the rollout process's pid)."""
    proc = _start(out)
    try:
        _wait_for_steps(proc, out, 3)
        child = _rollout_pid(proc.pid)
        assert child is not None
        send(proc, child)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, child


def _wait_gone(pid, timeout=30):
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_rollout_process_stops_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path):
    from erpo_fast.checkpoint import latest_intact_checkpoint

    out = tmp_path / "run"
    code, err, _ = _signal_mid_run(out, lambda proc, child: os.kill(child, signal.SIGKILL))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("erpo_fast.train: stopped: the rollout process died (exit code -9)"), last
    assert latest_intact_checkpoint(out) is not None


@pytest.mark.slow
def test_ctrl_c_stops_the_learner_and_the_rollout_process(tmp_path):
    # What a terminal's Ctrl-C does: SIGINT to the whole foreground group.
    code, err, child = _signal_mid_run(tmp_path / "run", lambda proc, _: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130, err[-3000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    _wait_gone(child)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


@pytest.mark.slow
def test_two_learner_ranks_with_one_rollout_process_match_one_rank(tmp_path):
    """Under torchrun rank 0's rollout process samples the global batch and each rank trains its slice: the
    run matches the one-process async run (as the synchronous two-rank run matches one rank)."""
    env = {**os.environ, "ERPO_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [*TINY, "--max-steps", "3", "--trainer.async_steps", "1", "--trainer.eval_every", "0",
            "--builtin.rope_theta", "100", "--builtin.warm_start_steps", "200"]
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd, out in (([sys.executable, "-m", "erpo_fast.train"], one),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), "-m", "erpo_fast.train"], two)):
        proc = subprocess.run([*cmd, *args, "--output-dir", str(out)], env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[0]["frac_mixed"] > 0, "step 1 must carry signal, or the comparison is vacuous"
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if key.startswith(TIMING):
                continue
            if isinstance(value, float):
                assert math.isclose(value, rb[key], rel_tol=1e-4, abs_tol=1e-6), (ra["step"], key, value, rb[key])
            else:
                assert value == rb[key], (ra["step"], key, value, rb[key])


def test_too_little_shared_memory_for_the_slots_is_a_usage_error(tmp_path, monkeypatch):
    from erpo_fast import weight_transport
    from erpo_fast.config import ConfigError

    real = weight_transport._check_shared_memory
    monkeypatch.setattr(weight_transport, "_check_shared_memory", lambda needed: real(needed * 10**9, str(tmp_path)))
    with pytest.raises(ConfigError, match="shared memory for its weight slots.*--shm-size"):
        weight_transport.WeightSlots({"w": (1000,)}, num_slots=2, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.slow
def test_async_steps_0_is_bit_identical_to_the_loop_before_async_existed(tmp_path, monkeypatch):
    """The golden file is what commit a6af403 (the synchronous loop before this feature) logged for this exact
    command on this project's CPU machine (an AMD EPYC); async_steps 0 must reproduce it to the bit, except the
    ``mismatch_*`` metrics: they measure the rounding difference between the engine's and the learner's log-probs
    (~1e-7), which another CPU model rounds differently (on an Intel Xeon with AMX the code of 2026-12-07, before
    and after lean_layers, matched every other metric to the bit), so there they must only stay at rounding
    level. (Should a CPU round any other metric differently, regenerate the file by running a6af403 there, never
    from the code under test.)

    a6af403 recomputed a shared prompt's attention per sample; attending it once (later) sums in another order, so
    the learner's attention is pinned to a6af403's per-sample blocks here, its norms and MLPs to transformers'
    autograd (lean_layers' norm backward rounds differently) and the fused loss to a6af403's row chunks (as many
    rows as the byte budget allows; a 256-row chunk sums the LM head's gradient in another order): what this test
    checks is the loop. The native engine's oneDNN-packed matmuls and its shared prompt k/v (later still) left
    every metric of this tiny model as it was on the AMD machine, so they run unpinned."""
    from erpo_fast import packed_attention
    from erpo_fast.kernels.fused_linear import chunked

    monkeypatch.setattr(packed_attention, "shares_prompt_attention", lambda *args: False)
    monkeypatch.setattr("erpo_fast.learner.apply_lean_layers", lambda model: 0)
    monkeypatch.setattr(chunked, "MAX_CHUNK_ROWS", 1 << 30)
    golden = json.loads((Path(__file__).parent / "golden" / "sync_tiny_a6af403.json").read_text())
    out = tmp_path / "run"
    # a6af403 ran every sequence through the learner; leaving the zero-advantage ones out (later) gives the same
    # gradient summed in another order, and its loss metrics cover the sequences that ran
    assert main([*golden["args"], "--trainer.async_steps", "0", "--trainer.skip_zero_advantage", "false",
                 "--output-dir", str(out)]) == 0
    # Added to the records after a6af403, so not in the file: sync_bytes (what the weight sync copied), the sync
    # check's statistics (its probe grew from 1 to 32 prompts since; it samples with its own seeds, so the run is
    # the same) and zero_adv_skipped
    later = {"sync_bytes", "zero_adv_skipped"}
    records = [{k: v for k, v in r.items() if k not in later and not k.startswith("sync_check_")}
               for r in _comparable(read_metrics(out))]
    assert len(records) == len(golden["metrics"])
    for got, want in zip(records, golden["metrics"]):
        rounding = {k for k in want if k.startswith("mismatch_")}
        assert rounding and got.keys() == want.keys()
        assert all(got[k] < 1e-5 and want[k] < 1e-5 for k in rounding)
        assert {k: v for k, v in got.items() if k not in rounding} == \
            {k: v for k, v in want.items() if k not in rounding}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_before"] == golden["heldout_before"]
    assert summary["heldout_after"] == golden["heldout_after"]


@pytest.mark.slow
def test_a_learner_killed_outright_takes_the_rollout_process_with_it(tmp_path):
    # SIGKILL: no cleanup runs in the learner.
    _, _, child = _signal_mid_run(tmp_path / "run", lambda proc, _: proc.kill(), timeout=60)
    _wait_gone(child)
    assert not Path(f"/proc/{child}").exists(), "the orphaned rollout process is still running"
