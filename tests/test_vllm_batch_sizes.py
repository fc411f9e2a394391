"""vLLM at real batch sizes: the default step (32 prompts x 8 samples) and a 200-prompt held-out set (x 4).

vLLM splits the prefill of a generate call that holds more prompt tokens than one scheduler step's budget (4,096
on its CPU build), samples the partial rows, discards those tokens and rewinds each seeded request's generator,
which a CPU generator cannot do ("CPU Generator does not use offset"). Every call here holds far more than
4,096 prompt tokens. The reference is the engine's own contract: a prompt's samples depend on its seed alone, so
the same prompt generated alone (one small call, never split) must give the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from erpo_fast.logger import read_metrics

pytestmark = pytest.mark.vllm


def _model_dir(path):
    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = BuiltinConfig(hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128)
    build_tiny_qwen2(tok, cfg, seed=0).save_pretrained(path)  # head_dim 32: vLLM's CPU attention rejects 16
    tok.save_pretrained(path)
    return path


def _problems(count, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(100, 1000, (2, count), generator=g).tolist()
    return [{"id": f"q{seed}-{i}", "prompt": f"what is {x}+{y}? answer with the number only:",
             "answer": str(x + y)} for i, (x, y) in enumerate(zip(a, b))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model = _model_dir(root / "model")
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _problems(64, 0)))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in _problems(200, 1)))
    return model, train, heldout


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def test_engine_default_batch_matches_each_prompt_alone(files):
    from erpo_fast.engines.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    g = torch.Generator().manual_seed(0)
    # distinct prompts of 160 tokens, so that prefix caching cannot shrink the prefill below one step's budget
    prompts = [torch.randint(6, 58, (160,), generator=g).tolist() for _ in range(200)]
    seeds = [1000 + 7 * i for i in range(32)]
    engine = VLLMEngine(files[0], dtype="float32", max_model_len=176, enforce_eager=True, cpu_threads=1)
    try:
        batch = engine.generate(prompts[:32], [1.0] * 32, 8, 12, seed=seeds)  # 32 x 8 x 160 = 40,960 tokens
        held = engine.generate(prompts, [1.0] * 200, 4, 8, seed=5)  # 200 x 4 x 160 = 128,000, one int seed
        for i in (0, 13, 31):
            alone = engine.generate([prompts[i]], [1.0], 8, 12, seed=[seeds[i]])[0]
            assert [s.token_ids for s in alone] == [s.token_ids for s in batch[i]]
            flat = [lp for s in batch[i] for lp in s.logprobs]
            assert [lp for s in alone for lp in s.logprobs] == pytest.approx(flat, abs=1e-5)
        # an int seed gives prompt i the seed seed + i
        alone = engine.generate([prompts[150]], [1.0], 4, 8, seed=[5 + 150])[0]
        assert [s.token_ids for s in alone] == [s.token_ids for s in held[150]]
    finally:
        engine.close()
    assert len({tuple(s.token_ids) for g in batch for s in g}) > 32  # really sampled, not one repeated answer


def test_evaluate_cli_200_heldout_prompts(files):
    model, _, heldout = files
    result = subprocess.run([sys.executable, "-m", "erpo_fast.evaluate", "--model", str(model), "--data",
                             str(heldout), "--k", "4", "--max-new-tokens", "8", "--reward", "arithmetic",
                             "--workers", "0", "--rollout", "vllm"], env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # stdout holds the result only (vLLM's own log lines go to stderr)
    assert json.loads(lines[-1])["num_prompts"] == 200
    assert all(len(line) < 200 for line in lines), max(map(len, lines))


def test_train_cli_default_batch_with_200_heldout(files, tmp_path):
    model, train, heldout = files
    out = tmp_path / "run"
    args = ["--model", str(model), "--data", str(train), "--data.heldout_path", str(heldout), "--data.reward",
            "arithmetic", "--data.reward_workers", "0", "--rollout", "vllm", "--rollout.max_new_tokens", "8",
            "--max-steps", "1", "--trainer.eval_every", "1", "--trainer.threads", "1", "--logging.plots", "false",
            "--rollout.enforce_eager", "true", "--output-dir", str(out)]  # prompts_per_step 32, n 8, eval_k 4
    result = subprocess.run([sys.executable, "-m", "erpo_fast.train", *args], env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_metrics(out)
    assert record["sequences_trained"] == 32 * 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_before"]["num_prompts"] == 200 and summary["heldout_after"]["num_prompts"] == 200
