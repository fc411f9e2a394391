"""LoRA (model.lora_rank): gradients, merged weights, PEFT files, engines that sample with the adapters, the sync check.

References are independent of erpo_fast.lora: float64 full-logits gradients of the merged model (test_learner's
reference loss) projected onto the adapters by the chain rule, peft's own ``merge_and_unload`` and
``PeftModel.from_pretrained``, and Hugging Face's forward of the peft model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_learner import make_learner, make_sequences, reference_loss, tiny_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from erpo_fast import lora
from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
from erpo_fast.engines import NativeEngine
from erpo_fast.engines.base import verify_sync
from erpo_fast.errors import ConfigError, WeightSyncError
from erpo_fast.tokenizer import build_char_tokenizer

ALL_WITH_HEAD = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def untied_model(seed=0):
    """A tiny Qwen2 whose LM head is its own weight (so LoRA may target it)."""
    config = Qwen2Config(vocab_size=58, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def randomise_b(model, seed=1, std=0.3):
    """B starts at zero (then A gets no gradient and the adapters change nothing): give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def merged_float64(base, adapted):
    """A float64 copy of ``base`` (no adapters) whose adapted weights are W + (alpha / r) B A, written out here."""
    model64 = copy.deepcopy(base).double()
    params = dict(model64.named_parameters())
    with torch.no_grad():
        for name, layer in lora.lora_layers(adapted):
            a = layer.lora_A["default"].weight.double()
            b = layer.lora_B["default"].weight.double()
            params[f"{name}.weight"].add_((b @ a) * layer.scaling["default"])
    return model64


@pytest.mark.parametrize("targets, build", [("all-linear", "tied"), (ALL_WITH_HEAD, "untied")])
def test_lora_gradients_are_the_full_gradients_projected_onto_the_adapters(tokenizer, targets, build):
    base = tiny_model(tokenizer) if build == "tied" else untied_model()
    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    learner = make_learner(copy.deepcopy(base), AlgorithmConfig(), TrainerConfig(micro_batch_size=3), cfg)
    randomise_b(learner.model)
    model64 = merged_float64(base, learner.model)
    seqs = make_sequences(7, seed=2)
    metrics = learner.loss_and_grads(seqs)
    ref_loss, *_ = reference_loss(model64, seqs, AlgorithmConfig())
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    full = dict(model64.named_parameters())
    layers = dict(lora.lora_layers(learner.model))
    assert ("lm_head" in layers) == (build == "untied")
    for name, layer in layers.items():
        g = full[f"{name}.weight"].grad  # dL/dW of the merged weight, float64
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        # W_eff = W + s B A  =>  dL/dA = s B^T G,  dL/dB = s G A^T
        torch.testing.assert_close(a.grad.double(), s * b.double().T @ g, rtol=1e-4, atol=2e-6, msg=name)
        torch.testing.assert_close(b.grad.double(), s * g @ a.double().T, rtol=1e-4, atol=2e-6, msg=name)
    trained = {n for n, p in learner.model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in lora.adapter_weights(learner.model)}  # nothing else gets a gradient
    in_optimizer = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in learner.model.named_parameters() if n in trained}


def test_merged_weights_are_base_plus_scaled_b_a_and_match_peft(tokenizer):
    from peft import get_peft_model

    base = tiny_model(tokenizer)
    cfg = ModelConfig(lora_rank=4, lora_alpha=12.0, lora_targets="q_proj,v_proj,down_proj")
    learner = make_learner(copy.deepcopy(base), model_cfg=cfg)
    randomise_b(learner.model)
    merged = dict(learner.named_weights())
    assert set(merged) == {f"model.layers.{i}.{m}.weight" for i in range(2)  # k_proj: fused with q and v
                           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    plain = dict(base.named_parameters())
    for i in range(2):
        assert torch.equal(merged[f"model.layers.{i}.self_attn.k_proj.weight"],
                           plain[f"model.layers.{i}.self_attn.k_proj.weight"])
    for name, layer in lora.lora_layers(learner.model):
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        expected = plain[f"{name}.weight"].double() + (12.0 / 4) * b @ a
        torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, rtol=1e-6, atol=1e-6)
    # peft's own merge of the same adapters (a PeftModel over a copy of the base, adapters copied in)
    peft_model = get_peft_model(copy.deepcopy(base), lora.lora_config(cfg))
    peft_params = dict(peft_model.named_parameters())
    for name, t in lora.adapter_weights(learner.model):
        peft_params[f"base_model.model.{name}"].data.copy_(t)
    reference = peft_model.merge_and_unload().state_dict()
    export = learner.full_model_state_dict()  # the merged Hugging Face export
    assert set(export) == set(reference)
    for name, t in reference.items():
        torch.testing.assert_close(export[name], t, rtol=1e-6, atol=1e-6, msg=name)
    assert base.state_dict().keys() == export.keys()  # loads as the plain model


def test_saved_adapters_load_in_peft_and_back(tokenizer, tmp_path):
    from peft import PeftModel

    base = tiny_model(tokenizer)
    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0)
    learner = make_learner(copy.deepcopy(base), model_cfg=cfg)
    randomise_b(learner.model)
    lora.save_adapters(tmp_path, dict(lora.adapter_weights(learner.model)), cfg, base_model="tiny")
    ids = torch.tensor([[5, 9, 11, 3, 7, 20]])
    with torch.no_grad():
        ours = learner.model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert lora.adapter_model_config(tmp_path).lora_rank == 4
    # ... and back into a fresh adapted model
    fresh = copy.deepcopy(base)
    lora.add_adapters(fresh, lora.adapter_model_config(tmp_path), seed=5)
    lora.load_adapters(fresh, tmp_path)
    for (n1, t1), (n2, t2) in zip(lora.adapter_weights(fresh), lora.adapter_weights(learner.model)):
        assert n1 == n2 and torch.equal(t1, t2)
    other = copy.deepcopy(base)
    lora.add_adapters(other, ModelConfig(lora_rank=8))
    with pytest.raises(Exception, match="another lora_rank"):
        lora.load_adapters(other, tmp_path)


def test_lora_targets_errors(tokenizer):
    with pytest.raises(ConfigError, match="lora_targets.*not found|lora_targets='nope'"):
        lora.add_adapters(tiny_model(tokenizer), ModelConfig(lora_rank=4, lora_targets="nope"))
    with pytest.raises(ConfigError, match="tied"):
        lora.add_adapters(tiny_model(tokenizer), ModelConfig(lora_rank=4, lora_targets="q_proj,lm_head"))


def _engine_logprobs_match_learner(engine, learner, seed=0):
    prompts = [[3, 5, 7, 9], [4, 6]]
    samples = engine.generate(prompts, [1.0, 0.8], 2, 6, stop_token_ids=[], seed=seed)
    from erpo_fast.batch import RolloutSequence

    seqs = [RolloutSequence(prompt_ids=p, response_ids=list(s.token_ids), rollout_logprobs=list(s.logprobs),
                            temperature=t, advantage=0.0, seq_key=10 * i + j)
            for i, (p, t, group) in enumerate(zip(prompts, [1.0, 0.8], samples)) for j, s in enumerate(group)]
    ours = learner.compute_logprobs(seqs)
    for s, lp in zip(seqs, ours):
        verify_sync(s.rollout_logprobs, lp, atol=1e-4, what="engine vs learner")


@pytest.mark.parametrize("backend", ["fused", "hf"])
@pytest.mark.parametrize("mode", ["shared", "own copy", "merged"])
def test_native_engine_samples_the_lora_policy(tokenizer, backend, mode):
    """After a training step, an engine that shares the learner's model, one with its own adapted copy (sent the
    adapters) and one with a plain copy (sent the merged weights) all sample the learner's policy."""
    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0, lora_targets="all-linear")
    model = tiny_model(tokenizer)
    plain = copy.deepcopy(model)
    lora.add_adapters(model, cfg)
    engine_model = {"shared": model, "own copy": copy.deepcopy(model), "merged": plain}[mode]
    engine = NativeEngine(engine_model, backend=backend)
    learner = make_learner(model, AlgorithmConfig(), TrainerConfig(lr=3e-2), cfg)
    randomise_b(learner.model, std=0.05)
    learner.train_on(make_sequences(6, seed=4))  # moves A and B
    if mode == "merged":
        engine.update_weights(learner.named_weights())
        assert engine.last_update_bytes == sum(t.numel() * 4 for _, t in learner.named_weights())
    else:
        engine.update_adapters(learner.adapter_weights())
        assert (engine.last_update_bytes == 0) == (mode == "shared")  # shared: nothing to copy
    _engine_logprobs_match_learner(engine, learner)


@pytest.mark.parametrize("mode", ["adapters", "merged"])
def test_sync_check_catches_an_engine_that_misses_an_adapter_update(tokenizer, mode, monkeypatch):
    from erpo_fast.rollout import check_probe

    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0)
    model = tiny_model(tokenizer)
    engine_model = copy.deepcopy(model)
    lora.add_adapters(model, cfg)
    if mode == "adapters":
        engine_model = copy.deepcopy(model)
    engine = NativeEngine(engine_model, backend="fused")
    learner = make_learner(model, AlgorithmConfig(), TrainerConfig(lr=5e-2), cfg)
    randomise_b(learner.model, std=0.05)
    push = engine.update_adapters if mode == "adapters" else engine.update_weights
    push(learner.adapter_weights() if mode == "adapters" else learner.named_weights())

    class Probe:  # what Rollout.sample_probe does: the engine samples, the learner re-scores
        @staticmethod
        def check(step):
            from erpo_fast.batch import RolloutSequence
            from erpo_fast.config import Config

            prompt = [3, 5, 7, 9, 11]
            (sample,) = engine.generate([prompt], [1.0], 1, 8, stop_token_ids=[], seed=[1234 + step])[0]
            probe = RolloutSequence(prompt_ids=prompt, response_ids=list(sample.token_ids),
                                    rollout_logprobs=list(sample.logprobs), temperature=1.0, advantage=0.0, seq_key=0)
            return check_probe(learner, [probe], Config(), step)

    assert Probe.check(1)["max_abs_diff"] < 1e-4
    learner.train_on(make_sequences(6, seed=5))
    with pytest.raises(WeightSyncError):  # the update never reached the engine
        Probe.check(2)
    push(learner.adapter_weights() if mode == "adapters" else learner.named_weights())
    Probe.check(3)


def test_kl_reference_of_a_lora_policy_is_the_base(tokenizer):
    """With LoRA the KL reference is the policy with its adapters off: no second copy of the model."""
    base = tiny_model(tokenizer)
    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0)
    algo = AlgorithmConfig(kl_beta=0.1)
    learner = make_learner(copy.deepcopy(base), algo, TrainerConfig(), cfg)
    assert learner.ref_model is None
    randomise_b(learner.model)
    seqs = make_sequences(5, seed=6)
    metrics = learner.loss_and_grads(seqs)
    model64 = merged_float64(base, learner.model)
    ref_loss, ref_metrics, *_ = reference_loss(model64, seqs, algo, ref_model64=copy.deepcopy(base).double())
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["kl"] == pytest.approx(ref_metrics["kl_mean"], rel=1e-4) and metrics["kl"] > 1e-4


# ---- end to end: python -m erpo_fast.train with model.lora_rank ---------------------------------------------


@pytest.fixture
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


LORA = ["--model.lora_rank", "8", "--model.lora_alpha", "16", "--trainer.lr", "2e-2"]
# The tiny warm-started model rarely solves a problem; a verifier that rewards even-length responses gives every
# group a spread of rewards, so the adapters do get gradients.
EVEN_LENGTH = "def even_length(response, answer):\n    return float(len(response) % 2 == 0)\n"


@pytest.fixture
def even_length(tmp_path):
    path = tmp_path / "even_length.py"
    path.write_text(EVEN_LENGTH)
    return ["--data.reward", f"{path}:even_length"]


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["adapters", "merged"])
def test_lora_run_resumes_exactly_and_trains_only_the_adapters(tmp_path, _cache, even_length, sync):
    from safetensors.torch import load_file
    from test_train import _comparable, _run

    from erpo_fast.checkpoint import latest_checkpoint
    from erpo_fast.logger import read_metrics

    args = [*LORA, *even_length, "--rollout.lora_sync", sync]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(full, "--max-steps", "6", *args) == 0
    assert _run(part, "--max-steps", "3", *args) == 0
    assert _run(part, "--max-steps", "6", "--resume") == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert _comparable(a) == _comparable(b)
    assert all(r["sync_check_trimmed_mean_abs_diff"] < 1e-4 for r in a)  # the check ran, and passed, every step
    # adapters mode shares the learner's tensors here (CPU, float32): nothing is copied; merged copies the
    # adapted layers (every linear of the one decoder layer) in float32
    hidden, inter = 32, 64
    adapted = hidden * hidden + 2 * (hidden * hidden // 2) + hidden * hidden + 3 * hidden * inter
    assert {r["sync_bytes"] for r in a} == ({0} if sync == "adapters" else {4 * adapted})
    ckpt = latest_checkpoint(full) / "model"
    adapters = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(adapters) == 2 * 7 and all(k.startswith("base_model.model.model.layers.0.") for k in adapters)
    assert any(float(t.abs().max()) > 0 for k, t in adapters.items() if "lora_B" in k)  # B moved off zero


@pytest.mark.slow
def test_lora_with_async_rollouts_gets_merged_weights(tmp_path, _cache, capsys):
    from test_train import _run

    from erpo_fast.logger import read_metrics

    assert _run(tmp_path / "a", "--max-steps", "3", *LORA, "--trainer.async_steps", "1") == 0
    records = read_metrics(tmp_path / "a")
    assert [r["staleness"] for r in records] == [0, 1, 1] and records[-1]["sync_bytes"] > 0
    capsys.readouterr()
    assert _run(tmp_path / "b", "--max-steps", "1", *LORA, "--trainer.async_steps", "1",
                "--rollout.lora_sync", "adapters") == 2
    assert "set rollout.lora_sync to merged" in capsys.readouterr().err


def test_lora_usage_errors_are_one_line(tmp_path, _cache, capsys):
    from test_train import _run

    assert _run(tmp_path / "a", "--max-steps", "1", "--model.lora_rank", "4", "--model.lora_targets", "nope") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "model.lora_targets='nope'" in err[0], err
    assert _run(tmp_path / "b", "--max-steps", "1", "--model.lora_rank", "4", "--trainer.eval_every", "0") == 0
    capsys.readouterr()
    assert _run(tmp_path / "b", "--max-steps", "2", "--resume", "--model.lora_rank", "0") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "holds LoRA adapters" in err[0], err


def test_merged_weights_name_every_projection_an_engine_fuses_with_an_adapted_one(tokenizer):
    """vLLM reloads its fused qkv_proj / gate_up_proj whole: adapting q_proj alone must still send k and v."""
    cfg = ModelConfig(lora_rank=4, lora_targets="q_proj,up_proj,o_proj")
    learner = make_learner(tiny_model(tokenizer), model_cfg=cfg)
    names = [n for n, _ in learner.named_weights()]
    layer = "model.layers.{}.{}.weight"
    want = {layer.format(i, m) for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert len(names) == len(set(names)) and set(names) == want  # down_proj: neither adapted nor fused with one
    assert lora.merged_shapes(learner.model) == {n: tuple(t.shape) for n, t in learner.named_weights()}
