"""A model whose turn ends with a token listed only in its generation config (Llama-3-Instruct's <|eot_id|>).

HF `generate` stops on every id of `generation_config.eos_token_id`; training rollouts and held-out evaluation
must stop there too (both engines), not sample on to max_new_tokens. The model here is built so that its first
response token is, almost surely, such a generation-config-only stop id; HF `generate` is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from erpo_fast.logger import read_metrics

PROMPT = "1+2="
MAX_NEW = 6


def _sharp_model_dir(path):
    """A tiny Qwen2 (head_dim 32, as vLLM's CPU attention needs) whose logits are scaled up so that sampling at
    T=1 is almost greedy; its greedy first token (not the tokenizer's EOS) is added to the generation config's
    EOS list. Returns (dir, that token)."""
    from transformers import GenerationConfig

    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.prompting import encode_prompt
    from erpo_fast.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = BuiltinConfig(hidden_size=64, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    ids = torch.tensor([encode_prompt(tok, PROMPT)])
    for seed in range(20):
        model = build_tiny_qwen2(tok, cfg, seed=seed)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(200.0)  # tied: the LM head's logits scale with it
            probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
        stop = int(probs.argmax())
        if stop != tok.eos_token_id and probs[stop] > 0.99999:
            break
    else:
        raise AssertionError("no seed gave a sharp first token")
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, stop], pad_token_id=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, stop, model, tok, ids


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    model_dir, stop, model, tok, ids = _sharp_model_dir(root / "model")
    # The reference: HF generate stops after that one token, because the generation config lists it.
    out = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
    assert out[0, ids.shape[1]:].tolist() == [stop]
    assert stop != tok.eos_token_id and tok.eos_token_id is not None
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": PROMPT, "answer": "3"}) + "\n" for i in range(4)))
    return model_dir, data


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def _train(model_dir, data, out, engine):
    args = ["--model", str(model_dir), "--data", str(data), "--data.heldout_path", str(data),
            "--data.reward", "arithmetic", "--data.reward_workers", "0", "--rollout", engine,
            "--rollout.max_new_tokens", str(MAX_NEW), "--rollout.n", "4", "--trainer.prompts_per_step", "4",
            "--max-steps", "1", "--trainer.eval_every", "1", "--trainer.eval_temperature", "0",
            "--trainer.eval_k", "1", "--trainer.threads", "1", "--logging.plots", "false",
            "--rollout.enforce_eager", "true", "--output-dir", str(out)]
    result = subprocess.run([sys.executable, "-m", "erpo_fast.train", *args], env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out), json.loads((out / "summary.json").read_text())


def _evaluate(model_dir, data, engine):
    result = subprocess.run([sys.executable, "-m", "erpo_fast.evaluate", "--model", str(model_dir), "--data",
                             str(data), "--k", "1", "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                             "--reward", "arithmetic", "--workers", "0", "--rollout", engine],
                            env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check(model_dir, data, tmp_path, engine):
    records, summary = _train(model_dir, data, tmp_path / "run", engine)
    # Every training sample stopped on its first token, at T=1 (before: all MAX_NEW tokens long).
    assert records[0]["response_len_mean"] == 1.0
    # Held-out evaluation (greedy) too, before and after the step.
    assert summary["heldout_before"]["response_tokens_mean"] == 1.0
    assert summary["heldout_after"]["response_tokens_mean"] == 1.0
    assert _evaluate(model_dir, data, engine)["response_tokens_mean"] == 1.0


def test_native_stops_on_generation_config_eos(sharp, tmp_path):
    _check(*sharp, tmp_path, "native")


@pytest.mark.vllm
def test_vllm_stops_on_generation_config_eos(sharp, tmp_path):
    _check(*sharp, tmp_path, "vllm")
