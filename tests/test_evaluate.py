"""pass@k / mean@k: the unbiased estimator against brute-force enumeration of k-subsets."""

import itertools

import numpy as np
import pytest

from erpo_fast.evaluate import pass_at_k, summarize


@pytest.mark.parametrize("n,c,k", [(4, 0, 4), (4, 1, 4), (16, 3, 4), (16, 0, 16), (16, 16, 1), (8, 5, 3), (6, 2, 1)])
def test_pass_at_k_equals_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_summarize_mean_and_pass():
    rewards = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=float)
    out = summarize(rewards, ks=(1, 4))
    assert out["mean_at_4"] == pytest.approx(5 / 12)
    assert out["pass_at_4"] == pytest.approx(2 / 3)  # prompts 0 and 2 solved at least once
    assert out["pass_at_1"] == pytest.approx((1 / 4 + 0 + 1) / 3)  # pass@1 = per-prompt accuracy


EXACT_MATCH = '''
def exact(response, answer):  # lenient enough that a random model scores, and not always
    return float(answer[-1] in response)


def broken(response, answer):
    return None
'''


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_evaluate_cli_reproduces_a_custom_reward_runs_heldout_score(tmp_path, lora):
    """`python -m erpo_fast.evaluate --reward path.py:fn` (the specs data.reward takes) on the run's exported
    model, at the run's evaluation settings and seed, gives the trainer's own final held-out numbers. A LoRA run's
    checkpoint model/ holds adapters: evaluated as --model (its base named in it), as --adapter on the base, and
    as the merged export (model/merged/), it gives the same numbers."""
    import json
    import os
    import subprocess
    import sys

    from conftest import save_tiny_model

    from erpo_fast.checkpoint import latest_checkpoint

    model_dir = save_tiny_model(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(9) for b in range(3)))
    verifier = tmp_path / "verifier.py"
    verifier.write_text(EXACT_MATCH)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "erpo_fast.train", "--model", str(model_dir), "--data", str(data),
         "--data.heldout_path", str(data), "--data.reward", f"{verifier}:exact", "--data.reward_workers", "0",
         "--rollout.max_new_tokens", "4", "--rollout.n", "4", "--trainer.prompts_per_step", "4", "--max-steps", "2",
         "--trainer.eval_every", "2", "--trainer.eval_k", "4", "--trainer.lr", "1e-2", "--trainer.threads", "1",
         "--logging.plots", "false", "--output-dir", str(out),
         *(["--model.lora_rank", "8", "--model.lora_merged_export", "true"] if lora else [])],
        env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    after = json.loads((out / "summary.json").read_text())["heldout_after"]
    assert 0 < after["mean_at_4"] < 1  # a score that could come out otherwise

    exported = latest_checkpoint(out) / "model"

    def evaluate(fn, *model):
        return subprocess.run(
            [sys.executable, "-m", "erpo_fast.evaluate", *(model or ["--model", str(exported)]), "--data",
             str(data), "--k", "4", "--max-new-tokens", "4", "--seed", str(after["seed"]), "--reward",
             f"{verifier}:{fn}", "--workers", "0"], env=env, capture_output=True, text=True, timeout=600)

    ways = [()]
    if lora:
        assert (exported / "adapter_model.safetensors").is_file() and not (exported / "model.safetensors").exists()
        ways += [("--model", str(model_dir), "--adapter", str(exported)), ("--model", str(exported / "merged"))]
    for way in ways:
        result = evaluate("exact", *way)
        assert result.returncode == 0, result.stderr[-2000:]
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert (got["mean_at_4"], got["pass_at_4"]) == (after["mean_at_4"], after["pass_at_4"]), way
    assert "evaluate (prompts): 27/27" in result.stderr  # progress while it runs (a plain line off a terminal)
    broken = evaluate("broken")
    assert broken.returncode == 1
    (line,) = broken.stderr.strip().splitlines()[-1:]
    assert line.startswith("erpo_fast.evaluate: stopped: held-out evaluation: the reward function ") and \
        "verifier.py:broken" in line and "NoneType" in line, line


def _half_credit(response, answer):
    return 0.5


def test_pass_at_k_counts_partial_credit_at_the_success_threshold():
    from erpo_fast.data import PromptRecord
    from erpo_fast.engines.base import Sample
    from erpo_fast.evaluate import evaluate
    from erpo_fast.rewards import RewardPool
    from erpo_fast.tokenizer import build_char_tokenizer

    class OneTokenEngine:
        eos_token_id = None

        def generate(self, prompts, temperatures, n, max_new_tokens, **kwargs):
            return [[Sample([10], [0.0], "length") for _ in range(n)] for _ in prompts]

    records = [PromptRecord(key=str(i), prompt=f"{i}+1=", answer=str(i + 1)) for i in range(3)]
    with RewardPool(_half_credit, num_workers=0) as pool:
        strict = evaluate(OneTokenEngine(), build_char_tokenizer(), records, reward_pool=pool, ks=(2,))
        lenient = evaluate(OneTokenEngine(), build_char_tokenizer(), records, reward_pool=pool, ks=(2,),
                           success_threshold=0.5)
    assert strict["mean_at_2"] == lenient["mean_at_2"] == 0.5
    assert (strict["pass_at_2"], lenient["pass_at_2"]) == (0.0, 1.0)
