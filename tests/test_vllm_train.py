"""`python -m erpo_fast.train --rollout vllm`, run the way a user runs it (a subprocess, on vLLM's CPU build in CI).

One small warm-started built-in model, shared through the cache by every run here:
- 20 steps with the weight-sync probe at every step, against the same run with `--rollout native`;
- exact resume: 3 steps, then resumed to 6, log what the uninterrupted run logged for those steps;
- DAPO dynamic sampling with refill rounds (several generate calls between two syncs);
- async rollout process; LoRA (adapters or merged weights), and `python -m erpo_fast.evaluate --rollout vllm` on a
  LoRA checkpoint.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import pytest

from erpo_fast.logger import read_metrics

SMALL = [
    # head_dim 32: vLLM's CPU attention rejects 16
    "--builtin.hidden_size", "64", "--builtin.layers", "2", "--builtin.heads", "2",
    "--builtin.kv_heads", "1", "--builtin.intermediate_size", "192",
    "--builtin.warm_start_steps", "400", "--builtin.warm_start_batch_size", "32",
    "--builtin.task", "arithmetic", "--builtin.warm_start_problems", "2000",  # easy: a barely trained model scores
    "--builtin.num_train", "128", "--builtin.num_heldout", "16", "--trainer.prompts_per_step", "8", "--rollout.n", "4",
    "--trainer.eval_every", "0", "--data.reward_workers", "0", "--logging.progress", "false",
    "--logging.plots", "false", "--trainer.threads", "1", "--trainer.lr", "1e-4", "--rollout.sync_check_every", "1",
    "--rollout.enforce_eager", "true", "--trainer.save_every", "3",
    # the learner runs every sequence, so the engine/learner mismatch is measured on every step's tokens (a barely
    # trained model's groups are often uniform: their sequences would be left out)
    "--trainer.skip_zero_advantage", "false",
]
TIMING = ("time_", "tokens_per_s")


def _train(out, *extra, engine="vllm"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = subprocess.run([sys.executable, "-m", "erpo_fast.train", *SMALL, "--rollout", engine,
                             "--output-dir", str(out), *extra], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(out)


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["ERPO_FAST_CACHE"] = str(path)  # subprocesses inherit it: one warm start for every run
    yield path
    os.environ.pop("ERPO_FAST_CACHE", None)


@pytest.fixture(scope="module")
def vllm_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm20")
    return out, _train(out, "--max-steps", "20")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_trains_20_steps_with_the_sync_probe_passing_like_native(vllm_run, tmp_path):
    _, records = vllm_run
    assert [r["step"] for r in records] == list(range(1, 21))
    # The probe ran at every step (sync_check_every=1) and a failed one stops the run with rc 1; the engine's
    # log-probs also equal the learner's on every trained token.
    for r in records:
        assert r["mismatch_logp_abs_max"] < 1e-3, r
    native = _train(tmp_path / "native", "--max-steps", "20", engine="native")
    a = [r["reward_mean"] for r in records]
    b = [r["reward_mean"] for r in native]
    mean_a, mean_b = statistics.mean(a), statistics.mean(b)
    assert 0.02 < mean_b < 0.98, "the warm-started model should be neither hopeless nor perfect"
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    assert abs(mean_a - mean_b) <= 4 * se + 1e-9, (mean_a, mean_b, se)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_resume_reproduces_the_uninterrupted_run(vllm_run, tmp_path):
    _, full = vllm_run
    part = tmp_path / "part"
    _train(part, "--max-steps", "3")
    resumed = _train(part, "--max-steps", "6", "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert _comparable(resumed) == _comparable(full[:6])


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_dynamic_sampling_refills_between_syncs(cache, tmp_path):
    records = _train(tmp_path / "dapo", "--max-steps", "4", "--algorithm.dynamic_sampling", "true",
                     "--algorithm.max_refill_rounds", "2")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert max(r["rollout_rounds"] for r in records) >= 2  # refill rounds really ran on the engine
    assert sum(r["groups_dropped"] for r in records) > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_in_the_async_rollout_process_trains_and_resumes_exactly(cache, tmp_path):
    """trainer.async_steps 1 with vLLM's engine in the rollout process: weights through the shared-memory slots,
    the sync probe at every step, batches one update behind, and a resume from a checkpoint with a batch in flight
    logging what the uninterrupted run logged."""
    import shutil

    full, part = tmp_path / "full", tmp_path / "part"
    a = _train(full, "--max-steps", "4", "--trainer.async_steps", "1")
    assert [r["policy_version"] for r in a] == [0, 0, 1, 2]
    assert a[0]["mismatch_logp_abs_max"] < 1e-3  # batch 1 is on-policy: engine and learner agree
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "erpo_fast.train", "--output-dir", str(part), "--resume"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _comparable(read_metrics(part)) == _comparable(a)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_samples_a_lora_policy_from_adapters_or_merged_weights_and_resumes_exactly(cache, tmp_path):
    """LoRA on q_proj, v_proj and down_proj (k_proj is fused with q and v in vLLM's qkv_proj): a LoRARequest per
    version, or the merged weights of the adapted layers; either way the sync probe passes at every step and the
    engine's log-probs equal the learner's on every trained token. A resume (adapters mode) is exact, and vLLM
    evaluates the checkpoint's adapters as it evaluates its merged export."""
    lora = ["--model.lora_rank", "8", "--trainer.lr", "2e-2", "--model.lora_targets", "q_proj,v_proj,down_proj",
            "--model.lora_merged_export", "true"]
    runs = {sync: _train(tmp_path / sync, "--max-steps", "4", *lora, "--rollout.lora_sync", sync)
            for sync in ("adapters", "merged")}
    for sync, records in runs.items():
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert all(r["mismatch_logp_abs_max"] < 1e-3 for r in records), sync
        assert any(r["loss"] != 0 for r in records), "the adapters must have learnt something"
    # adapters: A and B of 3 projections x 2 layers; merged: q, k, v and down_proj weights of 2 layers
    assert runs["adapters"][-1]["sync_bytes"] < runs["merged"][-1]["sync_bytes"] / 2
    part = tmp_path / "part"
    _train(part, "--max-steps", "3", *lora, "--rollout.lora_sync", "adapters")
    resumed = _train(part, "--max-steps", "4", "--resume")
    assert _comparable(resumed) == _comparable(runs["adapters"])
    _check_vllm_evaluates_the_adapters_like_the_merged_export(tmp_path, tmp_path / "adapters")


FINGERPRINT = """
import zlib
def fingerprint(response, answer):  # a reward that differs whenever the sampled text does
    return (zlib.crc32(response.encode()) % 997) / 997
"""


def _check_vllm_evaluates_the_adapters_like_the_merged_export(tmp_path, run):
    """`python -m erpo_fast.evaluate --rollout vllm` on a LoRA checkpoint: the adapters (a LoRARequest) sample
    what the merged export samples, text for text (the reward fingerprints every response), and not what the
    base model alone samples."""
    import json

    from erpo_fast.checkpoint import latest_checkpoint
    from erpo_fast.lora import read_adapter_config

    exported = latest_checkpoint(run) / "model"
    base = read_adapter_config(exported)["base_model_name_or_path"]
    data, verifier = tmp_path / "eval.jsonl", tmp_path / "fingerprint.py"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    verifier.write_text(FINGERPRINT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    def evaluate(*model):
        result = subprocess.run(
            [sys.executable, "-m", "erpo_fast.evaluate", *model, "--rollout", "vllm", "--data", str(data),
             "--k", "4", "--max-new-tokens", "6", "--seed", "5", "--reward", f"{verifier}:fingerprint",
             "--workers", "0", "--no-chat-template"], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])["mean_at_4"]

    adapters = evaluate("--model", str(exported))  # the base named in adapter_config.json, the adapters on top
    assert adapters == evaluate("--model", str(exported / "merged"))
    assert adapters != evaluate("--model", base)
