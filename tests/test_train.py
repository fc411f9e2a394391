"""End-to-end: `python -m erpo_fast.train` on a very small built-in setup — metrics contract, checkpoints,
exact resume, real data/model paths, and one-line errors for bad input."""

import json
import math
from pathlib import Path

import pytest

from erpo_fast.logger import read_metrics
from erpo_fast.train import main

TINY = [
    "--builtin.hidden_size", "32", "--builtin.layers", "1", "--builtin.heads", "2",
    "--builtin.kv_heads", "1", "--builtin.intermediate_size", "64", "--builtin.warm_start_steps", "20",
    "--builtin.task", "arithmetic", "--builtin.warm_start_problems", "2000",  # easy: a barely trained model scores
    "--builtin.warm_start_batch_size", "16", "--builtin.num_train", "64", "--builtin.num_heldout", "8",
    "--trainer.prompts_per_step", "4", "--rollout.n", "4", "--rollout.max_new_tokens", "6",
    "--trainer.eval_every", "2", "--trainer.eval_k", "2", "--data.reward_workers", "0",
    "--logging.progress", "false", "--trainer.threads", "1", "--trainer.lr", "1e-3",
    "--rollout.sync_check_every", "1", "--trainer.save_every", "3",
]
REQUIRED = ["step", "reward_mean", "frac_all_correct", "frac_all_wrong", "frac_mixed", "revived",
            "temperature_mean", "temperature_max", "entropy", "kl", "clip_frac", "grad_norm", "tokens_per_s",
            "time_rollout_s", "time_learn_s", "time_sync_s", "history_reward_mean", "correct_streak_max",
            "steps_since_seen_mean"]
TIMING = ("time_", "tokens_per_s")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(tmp_path, *extra):
    return main([*TINY, "--output-dir", str(tmp_path), *extra])


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def test_metrics_contract_checkpoint_and_plots(tmp_path, tmp_path_factory):
    # parity of the response's length: mixed groups every step, so the learner runs sequences and logs the loss's
    # metrics (with this barely trained model's own task every group can come back all wrong)
    reward = tmp_path_factory.mktemp("reward") / "parity_reward.py"
    reward.write_text("def score(response, answer):\n    return float(len(response) % 2)\n")
    assert _run(tmp_path, "--max-steps", "3", "--algorithm.ra", "true", "--algorithm.temperature_step",
                "0.5", "--rollout.sync_check_every", "2", "--data.reward", f"{reward}:score") == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    # the sync check's statistics on the step it ran: 32 probe prompts x 6 tokens, fp32 engine = learner
    assert [r.get("sync_check_tokens") for r in records] == [None, 32 * 6, None]
    assert 0 <= records[1]["sync_check_trimmed_mean_abs_diff"] <= records[1]["sync_check_mean_abs_diff"] < 1e-4
    for r in records:
        # the loss's token metrics need a sequence that ran (see trainer.skip_zero_advantage)
        ran = r["zero_adv_skipped"] < r["sequences_trained"]
        missing = [k for k in REQUIRED if k not in r and (ran or k not in ("entropy", "kl", "clip_frac"))]
        assert not missing, missing
        assert math.isclose(r["frac_all_correct"] + r["frac_all_wrong"] + r["frac_mixed"], 1.0)
        assert 1.0 <= r["temperature_mean"] <= r["temperature_max"] <= 1.5
        assert r["revived"] <= r["groups_above_base"]  # a revived group was sampled above base
    assert any(r["zero_adv_skipped"] < r["sequences_trained"] for r in records)  # the loss's metrics were checked
    assert "heldout_mean_at_2" in records[1] and "heldout_pass_at_2" in records[1]  # eval_every=2
    assert "heldout_mean_at_2" not in records[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["heldout_before"]) >= {"mean_at_2", "pass_at_2"}
    assert set(summary["heldout_after"]) >= {"mean_at_2", "pass_at_2"}
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "model" / "config.json").is_file()
    # The optimizer state is saved sharded (torch.distributed.checkpoint), and the manifest covers its files.
    manifest = json.loads((ckpt / "COMPLETE").read_text())["files"]
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp"} <= set(manifest)
    assert any((ckpt / "model").glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png"))


LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean", "dual_clip_frac")  # means; ratio_max: a max


def test_every_policy_loss_metric_reaches_metrics_jsonl(tmp_path, monkeypatch):
    """What `algorithms.policy_loss` computes is logged: per step, the mean over its two updates (ratio_max: the max),
    checked against policy_loss in float64 on the learner's own hidden states and old log-probs."""
    from erpo_fast import algorithms
    from erpo_fast.kernels import fused_linear
    from erpo_fast.kernels.fused_linear import naive
    from erpo_fast.learner import Learner

    steps: list[list[dict]] = []  # per train_on call: the reference metrics of each loss call
    train_on, loss = Learner.train_on, fused_linear.linear_grpo_loss

    def spy_train_on(self, batch):
        steps.append([])
        return train_on(self, batch)

    def spy_loss(hidden, weight, labels, temperature, advantages, mask, spec, **kw):
        lp = naive.linear_logprobs(hidden.detach().double(), weight.detach().double(), labels, temperature)
        steps[-1].append(algorithms.policy_loss(lp, kw["old_logprobs"].double(), advantages.double(), mask, spec,
                                                seq_ids=kw["seq_ids"])[1])
        return loss(hidden, weight, labels, temperature, advantages, mask, spec, **kw)

    monkeypatch.setattr(Learner, "train_on", spy_train_on)
    monkeypatch.setattr(fused_linear, "linear_grpo_loss", spy_loss)
    reward = tmp_path / "parity_reward.py"  # mixed groups from the first step on, so the policy moves
    reward.write_text("def score(response, answer):\n    return float(len(response) % 2)\n")
    out = tmp_path / "run"
    # every sequence runs (trainer.skip_zero_advantage false): a uniform group would leave an update without a loss call
    assert _run(out, "--max-steps", "3", "--data.reward", f"{reward}:score", "--trainer.updates_per_step", "2",
                "--trainer.skip_zero_advantage", "false",
                "--algorithm.eps_low", "0.005", "--algorithm.eps_high", "0.005", "--algorithm.dual_clip", "1.005") == 0
    records = read_metrics(out)
    assert len(records) == len(steps) == 3
    for record, refs in zip(records, steps):
        assert len(refs) == 2  # one micro-batch per update: each loss call is one update
        for key in LOSS_METRICS:
            assert record[key] == pytest.approx((refs[0][key] + refs[1][key]) / 2, rel=1e-5, abs=1e-7), key
        assert record["ratio_max"] == pytest.approx(max(r["ratio_max"] for r in refs), rel=1e-5)
        assert record["clip_frac"] == pytest.approx(record["clip_frac_low"] + record["clip_frac_high"])
    for key in (*LOSS_METRICS, "ratio_max"):  # the second update is off-policy: every metric is exercised
        assert any(r[key] > (1.0 if key == "ratio_max" else 0.0) for r in records), key


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(full, "--max-steps", "6") == 0
    assert _run(part, "--max-steps", "3") == 0
    assert _run(part, "--max-steps", "6", "--resume") == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert _comparable(a) == _comparable(b)


def _tiny_model_dir(tmp_path):
    from erpo_fast.config import config_from_cli
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.tokenizer import build_char_tokenizer

    cfg = config_from_cli(TINY)
    tok = build_char_tokenizer()
    path = tmp_path / "model"
    build_tiny_qwen2(tok, cfg.builtin, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_model_and_jsonl_data(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(6) for b in range(2)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    code = main([*TINY, "--output-dir", str(out), "--max-steps", "2", "--model", str(_tiny_model_dir(tmp_path)),
                 "--data", str(data), "--data.heldout_path", str(data), "--data.reward", "arithmetic"])
    assert code == 0
    assert len(read_metrics(out)) == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--trainer.max_stepz", "3"], "did you mean 'trainer.max_steps'"),
    (["--algorithm.max_temperature", "0.5"], "must be >= algorithm.base_temperature"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    assert main([*TINY, "--output-dir", str(tmp_path / "o"), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and message in err[0]


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    assert main([*TINY, "--output-dir", str(tmp_path / "o"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "Traceback" not in err


def test_help_lists_knobs(capsys):
    assert main(["--help"]) == 0
    assert "--algorithm.temperature_step" in capsys.readouterr().out


def test_summary_is_printed(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "2") == 0
    out = capsys.readouterr().out  # the run's result on stdout; progress and logs on stderr
    assert "held-out mean_at_2" in out and "residual prompts" in out and str(Path(tmp_path)) in out


def test_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("torch")
    from erpo_fast.engines import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    assert _run(tmp_path, "--max-steps", "1", "--rollout", "vllm") == 2
    assert "pip install 'erpo-fast[vllm]'" in capsys.readouterr().err


def test_diverged_policy_stops_cleanly_and_keeps_checkpoints(tmp_path, capsys):
    # A huge learning rate makes the first update blow the weights up; the next sampling sees non-finite
    # logits. The run must stop with exit 1 and a message, not a traceback, and keep what it had written.
    # 16 prompts: the first step has a group with signal, so its update is the one that diverges.
    code = _run(tmp_path, "--max-steps", "5", "--trainer.lr", "1e30", "--trainer.save_every", "1",
                "--builtin.warm_start_steps", "200", "--builtin.warm_start_batch_size", "32",
                "--rollout.sync_check_every", "0", "--trainer.prompts_per_step", "16")
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite logits" in err and "Traceback" not in err
    assert (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_dynamic_sampling_drops_and_refills(tmp_path):
    assert _run(tmp_path, "--max-steps", "3", "--algorithm.dynamic_sampling", "true",
                "--algorithm.max_refill_rounds", "2", "--builtin.warm_start_steps", "200",
                "--builtin.warm_start_batch_size", "32") == 0
    n, batch = 4, 4
    for r in read_metrics(tmp_path):
        signal_groups = round(r["frac_mixed"] * batch)  # without RA only mixed groups carry signal
        assert 1 <= r["rollout_rounds"] <= 3
        assert r["sequences_trained"] % n == 0 and r["sequences_trained"] <= n * batch
        assert r["sequences_trained"] >= n * signal_groups  # refilling never loses first-round signal
        if r["rollout_rounds"] == 1:
            assert r["groups_dropped"] == batch - signal_groups


def test_stale_engine_fails_the_weight_sync_check(tmp_path, capsys, monkeypatch):
    # An engine that silently keeps its old weights (a bug one public trainer shipped) must stop the run at the
    # sync check, with exit 1 and a message. 16 prompts and a warmer start: the first update has signal.
    from erpo_fast.engines import NativeEngine

    monkeypatch.setattr(NativeEngine, "update_weights", lambda self, named_weights: None)
    # A separate engine copy (a shared one sees every update without a sync; tests/test_shared_weights.py breaks
    # that one its own way).
    code = _run(tmp_path, "--max-steps", "2", "--trainer.lr", "3e-2", "--builtin.warm_start_steps", "200",
                "--builtin.warm_start_batch_size", "32", "--trainer.prompts_per_step", "16",
                "--rollout.share_weights", "false")
    err = capsys.readouterr().err
    assert code == 1
    assert "weight sync check at step 1" in err and "not sampling from the synced weights" in err
    assert "Traceback" not in err


def test_resume_with_another_seed_is_a_one_line_usage_error(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--max-steps", "2", "--resume", "--seed", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--resume from" in err[0] and "seed" in err[0], err


COUNTING_VERIFIER = '''
import os


def counting(response, answer):
    with open(os.environ["ERPO_TEST_CALLS"], "a") as f:
        f.write("x\\n")
    return float(response.strip() == answer)
'''


def test_final_heldout_evaluation_runs_once_when_the_last_step_was_evaluated(tmp_path, monkeypatch):
    # max_steps % eval_every == 0 (as at the defaults): the evaluation of the last step is the final one.
    verifier, calls = tmp_path / "counting.py", tmp_path / "calls.txt"
    verifier.write_text(COUNTING_VERIFIER)
    monkeypatch.setenv("ERPO_TEST_CALLS", str(calls))
    assert _run(tmp_path / "run", "--max-steps", "2", "--data.reward", f"{verifier}:counting") == 0
    train_calls = 2 * 4 * 4  # steps x prompts_per_step x rollout.n
    heldout_calls = 8 * 2  # num_heldout x eval_k, at steps 0 and 2 only
    assert len(calls.read_text().splitlines()) == train_calls + 2 * heldout_calls
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = read_metrics(tmp_path / "run")[-1]
    assert summary["heldout_after"]["mean_at_2"] == last["heldout_mean_at_2"]
    assert last["time_eval_s"] > 0  # evaluation has its own time, apart from the weight sync


def test_export_loads_as_the_original_and_checkpoints_warn_nothing(tmp_path, recwarn):
    from transformers import AutoConfig

    model_dir = _tiny_model_dir(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "use_cache": True}))  # as most models ship
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(6)
                            for b in range(2)))
    args = [*TINY, "--model", str(model_dir), "--data", str(data), "--data.reward", "arithmetic"]
    assert main([*args, "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--resume"]) == 0
    export = tmp_path / "run" / "checkpoints" / "step_00000002" / "model"
    assert AutoConfig.from_pretrained(export).use_cache is True
    assert "local_files_only" not in json.loads((export / "tokenizer_config.json").read_text())
    # one process: torch.distributed.checkpoint's "torch.distributed is disabled" warning says nothing to a user
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)]


def test_too_long_prompt_names_its_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    rows[3] = {"prompt": "1+" * 40 + "1=", "answer": "41"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main([*TINY, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--model",
                 str(_tiny_model_dir(tmp_path)), "--data", str(data), "--data.max_prompt_length", "20"])
    assert code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "d.jsonl: line 4: prompt of" in line and "max_prompt_length=20" in line, line


def test_lr_alias_and_other_trainers_names_suggest_ours(tmp_path, capsys):
    from erpo_fast.config import config_from_cli

    assert config_from_cli(["--lr", "3e-5"]).trainer.lr == 3e-5
    assert main([*TINY, "--output-dir", str(tmp_path), "--trainer.learning_rate", "1e-5"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "did you mean '--trainer.lr'" in line or "did you mean 'trainer.lr'" in line, line
