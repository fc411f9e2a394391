"""The memory plan against independent counts: parameters from the model itself and from Qwen2's closed form,
activation bytes from autograd's real saved tensors, the KV cache from the engine's own cache object, and the
``--plan`` command line on a config-only model folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.common import saved_tensor_bytes
from erpo_fast.batch import RolloutSequence, micro_batches, pack_sequences, packed_length
from erpo_fast.config import AlgorithmConfig, Config, ConfigError, ModelConfig, TrainerConfig, build_config
from erpo_fast.engines.native import RaggedKVCache
from erpo_fast.engines.prompt_kv import SharedPromptKVCache
from erpo_fast.learner import Learner
from erpo_fast.memory_plan import GB, ModelShape, fit, plan_memory, saved_activation_bytes

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, max_position_embeddings=512)


def qwen2(tied=True, **over):
    config = Qwen2Config(**{**SHAPE, **over}, tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_model_and_the_closed_form(tied):
    model = qwen2(tied)
    shape = ModelShape.from_config(model.config)
    assert shape.params * 4 == sum(p.numel() * p.element_size() for p in model.parameters())
    h, i, v, layers, kv = 64, 160, 300, 2, 2 * 16
    per_layer = h * h + 2 * h * kv + (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # q,k,v (+bias), o, mlp, 2 norms
    assert shape.params == v * h * (1 if tied else 2) + layers * per_layer + h


def _saved_bytes(learner, batch, params):
    return saved_tensor_bytes(lambda: learner._hidden(learner._policy, batch)[0], exclude=params)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])  # erpo_fast.lean_layers on / off
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16 on CPU: autocast over fp32 master weights
@pytest.mark.parametrize("ckpt", [False, True])
def test_saved_activations_match_autograds_saved_tensors(ckpt, dtype, lean, monkeypatch):
    if not lean:
        monkeypatch.setattr("erpo_fast.learner.apply_lean_layers", lambda model: 0)
    model = qwen2()
    learner = Learner(model, AlgorithmConfig(), TrainerConfig(micro_batch_size=1000),
                      ModelConfig(gradient_checkpointing=ckpt, dtype=dtype), device="cpu", max_len=64)
    g = torch.Generator().manual_seed(0)
    seqs = [RolloutSequence(list(range(5, 45)) if i < 4 else list(range(7, 37)),
                            torch.randint(3, 300, (50,), generator=g).tolist(), [], 1.0, 1.0, i) for i in range(8)]
    batch = pack_sequences(seqs, share_prompts=True)
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    measured, hidden = _saved_bytes(learner, batch, params)
    measured += hidden.numel() * hidden.element_size()  # the [N, H] rows the fused loss saves
    shape = dataclasses.replace(ModelShape.from_config(model.config), lean=lean)
    packed = batch.input_ids.shape[1]
    layout = batch.layout()
    assert layout.suffix_blocks  # the groups' prompts run their attention once
    predicted = saved_activation_bytes(shape, packed=packed, queries=layout.query_slots, keys=layout.key_slots,
                                       trained=batch.num_tokens,
                                       act_bytes=4 if dtype == "float32" else 2, checkpointing=ckpt,
                                       autocast=dtype != "float32", head_bytes=4)  # CPU: the fp32 master head
    assert predicted == pytest.approx(measured, rel=0.05)


def _seqs(groups, n, prompt, response):
    return [RolloutSequence([g + 3] * prompt, [1] * response, [], 1.0, 0.0, g * n + j)
            for g in range(groups) for j in range(n)]


def test_micro_batches_respect_both_bounds_and_cover_every_sequence():
    seqs = _seqs(4, 8, 20, 10) + [RolloutSequence([9] * 300, [1] * 5, [], 1.0, 0.0, 999)]
    for share in (False, True):
        parts = micro_batches(seqs, max_sequences=6, max_tokens=100, share_prompts=share)
        assert [i for p in parts for i in p] == list(range(len(seqs)))  # contiguous, in order, all
        for p in parts:
            chunk = [seqs[i] for i in p]
            assert len(p) <= 6
            assert packed_length(chunk, share_prompts=share) <= 100 or len(p) == 1
            assert packed_length(chunk, share_prompts=share) == pack_sequences(
                chunk, share_prompts=share).input_ids.shape[1]
        assert parts[-1] == [len(seqs) - 1]  # the 305-token sequence runs alone
    # Shared prompts pack more samples per budget: 20 + 8 x 10 = 100 tokens hold a whole group.
    assert micro_batches(_seqs(2, 8, 20, 10), max_sequences=64, max_tokens=100, share_prompts=True) == [
        list(range(8)), list(range(8, 16))]
    assert micro_batches(_seqs(1, 8, 20, 10), max_sequences=3, share_prompts=False) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_kv_cache_term_is_the_engines_cache():
    model = qwen2()
    cfg = build_config("none", overrides={"model.path": "x", "rollout.n": 4, "trainer.prompts_per_step": 3,
                                          "rollout.max_new_tokens": 16, "data.max_prompt_length": 24})
    shape = ModelShape.from_config(model.config)
    plan = plan_memory(cfg, shape, device=torch.device("cpu"), runtime_bytes=0)
    kv = next(v for k, v in plan.terms.items() if k.startswith("engine KV cache"))
    # On CPU the fused backend keeps each prompt's k/v once for its n rows.
    shared = SharedPromptKVCache(2, 3, 4, 2, torch.full((3,), 24), 16, 16, torch.float32, torch.device("cpu"))
    assert kv == sum(t.numel() * t.element_size() for t in shared.prompt_keys + shared.prompt_values
                     + shared.response_keys + shared.response_values)
    cuda = plan_memory(cfg, shape, device=torch.device("cuda"), runtime_bytes=0)  # per-row copies there (bf16)
    cache = RaggedKVCache(2, 12, 2, 24 + 16, 16, torch.bfloat16, torch.device("cpu"))
    assert next(v for k, v in cuda.terms.items() if k.startswith("engine KV cache")) == sum(
        t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert plan.terms["engine weights"] == 0 and plan.shares_weights  # fp32 engine on CPU: one copy
    p = shape.params
    assert plan.terms["weights (fp32 master)"] == 4 * p and plan.terms["optimizer state (AdamW, fp32)"] == 8 * p
    cfg.rollout.share_weights = False
    copy_plan = plan_memory(cfg, shape, device=torch.device("cpu"), runtime_bytes=0)
    assert copy_plan.terms["engine weights"] == 4 * p and copy_plan.peak == plan.peak + 4 * p
    assert any("own copy" in note for note in copy_plan.notes)
    bf16 = plan_memory(cfg, shape, device=torch.device("cuda"), runtime_bytes=0)  # a plan needs no GPU
    assert not bf16.shares_weights and bf16.terms["engine weights"] == 2 * p


@pytest.mark.parametrize("prompt,new,budget", [(24, 16, 0), (24, 16, 100), (40, 300, 0), (5, 8, 30)])
@pytest.mark.parametrize("cpu", [True, False])
def test_attention_slots_of_the_plan_are_the_layouts(prompt, new, budget, cpu):
    """The plan's largest micro-batch counts the attention query and key slots that PackedLayout builds for the
    same full-length sequences (shared prompt attention on CPU; not past the suffix limit: 300 new tokens)."""
    from erpo_fast.memory_plan import _largest_micro_batch

    cfg = build_config("none", overrides={"model.path": "x", "rollout.n": 4, "trainer.prompts_per_step": 3,
                                          "rollout.max_new_tokens": new, "trainer.micro_batch_tokens": budget})
    seqs = [RolloutSequence([g + 3] * prompt, [1] * new, [], 1.0, 0.0, g * 4 + j) for g in range(3) for j in range(4)]
    expected = (0, 0, 0, 0)
    for idx in micro_batches(seqs, max_sequences=cfg.trainer.micro_batch_size, max_tokens=budget, share_prompts=True):
        batch = pack_sequences([seqs[i] for i in idx], share_prompts=True)
        layout = type(batch.layout()).from_segments(batch.segments, batch.input_ids.shape[1],
                                                    share_prompt_attention=cpu)
        expected = max(expected, (batch.input_ids.shape[1], layout.query_slots, layout.key_slots, batch.num_tokens))
    assert _largest_micro_batch(cfg, prompt, True, cpu) == expected


def test_token_budget_bounds_the_activations():
    cfg = build_config("none", overrides={"model.path": "x", "rollout.max_new_tokens": 512,
                                          "data.max_prompt_length": 128})
    shape = ModelShape.from_config(qwen2().config)
    by_seq = plan_memory(cfg, shape, device=torch.device("cpu"))
    cfg.trainer.micro_batch_tokens = 1024
    by_tokens = plan_memory(cfg, shape, device=torch.device("cpu"))
    assert by_tokens.micro_batch_tokens <= 1024 < by_seq.micro_batch_tokens
    act = [next(v for k, v in p.terms.items() if k.startswith("activations")) for p in (by_seq, by_tokens)]
    assert act[1] < act[0] / 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_loss_workspace_covers_the_chunked_loss_fp32_buffers(dtype):
    """On CPU the fused loss computes in fp32 whatever the compute dtype: the plan's workspace term (untied head,
    so no weight-gradient term) covers the chunk buffer and scratch tile the kernel itself allocates."""
    from erpo_fast.kernels.fused_linear.chunked import _Workspace

    cfg = build_config("none", overrides={"model.path": "x", "model.dtype": dtype, "rollout.max_new_tokens": 512,
                                          "data.max_prompt_length": 128})
    shape = ModelShape.from_config(Qwen2Config(**{**SHAPE, "vocab_size": 50_000}, tie_word_embeddings=False))
    term = plan_memory(cfg, shape, device=torch.device("cpu")).terms["loss workspace (logits chunk, LM-head gradient)"]
    ws = _Workspace(10_000, shape.vocab, getattr(torch, dtype), torch.device("cpu"))
    allocated = sum(t.numel() * t.element_size() for t in (ws.buf, ws.scratch))
    assert ws.buf.dtype == torch.float32 and allocated <= term <= 2 * allocated


def test_fit_turns_checkpointing_on_or_names_the_knobs(caplog):
    cfg = build_config("none", overrides={"model.path": "x", "rollout.max_new_tokens": 256,
                                          "data.max_prompt_length": 64, "trainer.micro_batch_size": 64})
    shape = ModelShape.from_config(qwen2(hidden_size=512, intermediate_size=2048, num_hidden_layers=8).config)
    cpu = torch.device("cpu")
    plain = plan_memory(cfg, shape, device=cpu, runtime_bytes=0)
    ckpt = plan_memory(cfg, shape, device=cpu, runtime_bytes=0, checkpointing=True)
    assert ckpt.peak < plain.peak
    budget = (plain.peak + ckpt.peak) // 2
    with caplog.at_level(logging.INFO, logger="erpo_fast"):
        plan = fit(cfg, shape, device=cpu, budget=budget, runtime_bytes=0)
    assert cfg.model.gradient_checkpointing and plan.checkpointing and plan.fits
    assert "turned model.gradient_checkpointing on" in caplog.text
    cfg.model.gradient_checkpointing = False
    with pytest.raises(ConfigError, match="micro_batch_tokens") as e:  # CUDA: a usage error naming the knob
        fit(cfg, shape, device=torch.device("cuda"), budget=int(ckpt.peak * 0.6), runtime_bytes=0)
    assert "\n" not in str(e.value)


def _config_only(tmp_path) -> Path:
    d = tmp_path / "config-only"
    Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    return d


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "erpo_fast.train", "--plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plan_cli_on_a_config_only_model(tmp_path):
    d = _config_only(tmp_path)
    out = _plan_cli("--model", str(d), "--data", "none.jsonl", "--trainer.device", "cuda", "--rollout", "vllm",
                    "--trainer.memory_budget_gb", "80", "--trainer.micro_batch_tokens", "2048")
    assert out.returncode == 0, out.stderr
    assert "494.0M parameters" in out.stdout and "fits" in out.stdout and "compute bfloat16" in out.stdout
    small = _plan_cli("--model", str(d), "--data", "none.jsonl", "--trainer.device", "cuda",
                      "--trainer.memory_budget_gb", "4")
    assert small.returncode == 1 and "does not fit" in small.stdout
    bad = _plan_cli("--model", str(tmp_path / "nowhere"), "--data", "none.jsonl")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "config.json" in bad.stderr
    assert json.loads((d / "config.json").read_text())["hidden_size"] == 896  # untouched, never loaded as weights


def test_config_defaults_keep_the_old_behaviour():
    t = Config().trainer
    assert t.micro_batch_tokens == 0 and t.optimizer_impl == "auto" and t.memory_budget_gb == 0
    assert GB == 1e9


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, caplog):
    import logging

    from erpo_fast import session
    from erpo_fast.config import build_config

    cfg = build_config("none", overrides={"model.dtype": "bfloat16"})
    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="erpo_fast"):
            session._warn_if_bf16_is_emulated(cfg, torch.device("cpu"))
        assert ("slower than float32" in caplog.text) is warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="erpo_fast"):
        session._warn_if_bf16_is_emulated(build_config("none"), torch.device("cpu"))  # float32: nothing to say
    assert not caplog.text


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,lm_head"])
def test_lora_terms_are_the_adapters_peft_injects(targets):
    """The plan's adapter count against peft's own injection, and its LoRA weight/gradient/AdamW terms against
    what a learner holds after a step (frozen base in the compute dtype, everything else adapters only)."""
    model = qwen2(tied=False)
    shape = ModelShape.from_config(model.config)
    cfg = build_config("none", overrides={"model.path": "x", "model.lora_rank": 8, "model.lora_targets": targets})
    learner = Learner(model, AlgorithmConfig(), TrainerConfig(), cfg.model, device="cpu", max_len=8)
    adapters = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    from erpo_fast.memory_plan import lora_params

    assert lora_params(cfg, shape) == adapters > 0
    seq = RolloutSequence([5, 6, 7], [8, 9], [-1.0, -1.0], 1.0, 1.0, 0)
    learner.train_on([seq, RolloutSequence([5, 6], [9], [-1.0], 1.0, -1.0, 1)])
    plan = plan_memory(cfg, shape, device=torch.device("cpu"), runtime_bytes=0)
    terms = list(plan.terms.values())
    held = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    moments = sum(v.numel() * v.element_size() for s in learner.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    assert (terms[1], terms[2], terms[3]) == (held, 4 * adapters, moments)


def test_plan_answers_qwen25_7b_with_lora_and_vllm_on_one_h100(tmp_path):
    """Qwen2.5-7B's config (public numbers) with vLLM at 0.35 of an 80 GB GPU: full fine-tuning cannot fit and
    the plan says LoRA would; LoRA r=16 fits, with activation checkpointing (the plan turns it on)."""
    d = tmp_path / "qwen2.5-7b"
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False).save_pretrained(d)
    common = ["--model", str(d), "--data", "none.jsonl", "--trainer.device", "cuda", "--rollout", "vllm",
              "--rollout.gpu_memory_utilization", "0.35", "--trainer.memory_budget_gb", "80"]
    full = _plan_cli(*common)
    assert full.returncode == 1 and "try LoRA: --model.lora_rank 16" in full.stdout, full.stdout
    lora = _plan_cli(*common, "--model.lora_rank", "16")
    assert lora.returncode == 0, lora.stdout
    assert "LoRA 40.4M fp32" in lora.stdout and "activation checkpointing would be turned on" in lora.stdout
    assert "fits" in lora.stdout and "parking its 15.2 GB of weights in host memory" in lora.stdout
