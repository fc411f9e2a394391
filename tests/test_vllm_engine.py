"""VLLMEngine: the no-vLLM error path (CPU), and real generation / sync / sleep checks (GPU + vLLM).

The GPU tests build a tiny random-weight Qwen2 checkpoint in a temporary directory and compare vLLM (bf16)
with Hugging Face transformers running the same weights in fp32, so log-prob checks allow bf16 error.
They need a CUDA device and vLLM installed.
"""

from __future__ import annotations

import sys

import pytest
import torch

from erpo_fast.rollout import NativeEngine, VLLMEngine, make_engine
from erpo_fast.rollout.vllm_engine import INSTALL_HINT, WeightSyncError, teacher_forced_logprobs

# ---- CPU: behaviour without vLLM --------------------------------------------------------------------


def test_missing_vllm_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'erpo-fast\[vllm\]'"):
        VLLMEngine(tmp_path)
    with pytest.raises(ImportError, match="VLLMEngine needs vLLM"):
        make_engine("vllm", tmp_path)
    assert "erpo-fast[vllm]" in INSTALL_HINT


def test_rollout_package_imports_without_vllm():
    import subprocess

    # A fresh interpreter where vLLM cannot be imported: erpo_fast and erpo_fast.rollout still import,
    # and neither pulls vLLM in.
    code = ("import sys; sys.modules['vllm'] = None; import erpo_fast, erpo_fast.rollout as r; "
            "assert r.vllm_available() in (True, False); assert sys.modules['vllm'] is None; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_make_engine_native_and_unknown_kind():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert isinstance(make_engine("native", model), NativeEngine)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("tgi", model)


# ---- GPU: real vLLM ---------------------------------------------------------------------------------

VOCAB = 512


def _random_qwen2(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2, eos_token_id=2, bos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from erpo_fast.tokenizer import build_char_tokenizer

    model_dir = tmp_path_factory.mktemp("tiny-qwen2")
    base = _random_qwen2(seed=0)
    base.save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)  # ids < 512; vLLM loads a tokenizer by default
    engine = VLLMEngine(model_dir, dtype="bfloat16", gpu_memory_utilization=0.25, max_model_len=256,
                        enforce_eager=True, sleep_level=2)
    return engine, base.cuda()


def _probe(seed: int = 3, length: int = 24) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


@pytest.mark.gpu
def test_vllm_generates_with_contract_shapes_and_logprobs(vllm_setup):
    engine, base = vllm_setup
    prompts = [_probe(1, 7), _probe(2, 12)]
    temps = [0.7, 1.3]
    out = engine.generate(prompts, temps, n=3, max_new_tokens=10, stop_token_ids=[], seed=0)
    assert engine.is_sleeping  # auto_sleep after generate
    assert [len(group) for group in out] == [3, 3]
    for prompt, temp, group in zip(prompts, temps, out):
        for s in group:
            assert s.finish_reason == "length" and len(s.token_ids) == 10
            ids = torch.tensor([prompt + s.token_ids], device="cuda")
            with torch.no_grad():
                logits = base(ids).logits[0, len(prompt) - 1: -1].float()
            want = torch.log_softmax(logits / temp, -1).gather(1, ids[0, len(prompt):, None])[:, 0].cpu()
            diff = (torch.tensor(s.logprobs) - want).abs()
            assert diff.mean() < 0.05 and diff.max() < 0.3, diff
    # A stop token ends a sample and is kept as its last token.
    greedy = engine.generate([prompts[0]], [0.0], n=1, max_new_tokens=10, stop_token_ids=[])[0][0]
    stop = greedy.token_ids[3]
    stopped = engine.generate([prompts[0]], [0.0], n=1, max_new_tokens=10, stop_token_ids=[stop])[0][0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]
    assert stopped.logprobs == [0.0] * len(stopped.token_ids)


@pytest.mark.gpu
def test_vllm_per_prompt_temperature_changes_the_distribution(vllm_setup):
    from scipy.stats import chisquare

    engine, base = vllm_setup
    prompt = _probe(5, 9)
    draws = 2000
    out = engine.generate([prompt, prompt], [0.5, 2.0], n=draws, max_new_tokens=1, stop_token_ids=[], seed=1)
    with torch.no_grad():
        logits = base(torch.tensor([prompt], device="cuda")).logits[0, -1].double().cpu()

    def p_value(group, temp):
        expected = torch.softmax(logits / temp, -1) * draws
        observed = torch.bincount(torch.tensor([s.token_ids[0] for s in group]), minlength=VOCAB).double()
        rare = expected < 5
        obs = torch.cat([observed[~rare], observed[rare].sum()[None]])
        exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
        return chisquare(obs.numpy(), exp.numpy()).pvalue

    assert p_value(out[0], 0.5) > 1e-3 and p_value(out[1], 2.0) > 1e-3
    assert p_value(out[0], 2.0) < 1e-6 and p_value(out[1], 0.5) < 1e-6


@pytest.mark.gpu
def test_vllm_weight_update_is_visible_and_verified(vllm_setup):
    engine, base = vllm_setup
    probe = _probe()
    target = _random_qwen2(seed=1).cuda()
    engine.update_weights(target.state_dict().items())
    stats = engine.verify_sync(probe, teacher_forced_logprobs(target, probe), atol=0.05)
    assert stats["mean_abs_diff"] <= 0.05
    with pytest.raises(WeightSyncError, match="not sampling from the synced weights"):
        engine.verify_sync(probe, teacher_forced_logprobs(base, probe), atol=0.05)
    greedy = engine.generate([probe], [0.0], n=1, max_new_tokens=8, stop_token_ids=[])[0][0]
    # Greedy under the new weights: every chosen token is the target model's argmax, up to bf16 near-ties.
    ids = torch.tensor([probe + greedy.token_ids], device="cuda")
    with torch.no_grad():
        logits = target(ids).logits[0, len(probe) - 1: -1].float()
    chosen = logits.gather(1, ids[0, len(probe):, None])[:, 0]
    assert (logits.max(-1).values - chosen).max() < 0.1
    with pytest.raises(KeyError, match="no parameter named"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    # Back to the base weights for the other tests.
    engine.update_weights(base.state_dict().items())
    engine.verify_sync(probe, teacher_forced_logprobs(base, probe), atol=0.05)


@pytest.mark.gpu
def test_vllm_sleep_frees_memory_and_level2_needs_full_resync(vllm_setup):
    engine, base = vllm_setup
    engine.wake_up()
    torch.cuda.synchronize()
    free_awake, total = torch.cuda.mem_get_info()
    engine.sleep()
    torch.cuda.synchronize()
    free_asleep, _ = torch.cuda.mem_get_info()
    # gpu_memory_utilization=0.25: most of that quarter of the GPU is KV cache, all of it is released.
    assert free_asleep - free_awake > 0.15 * total
    # Level 2 discarded the weights: a partial sync is refused, a full one brings the engine back.
    name, tensor = next(iter(base.state_dict().items()))
    engine.update_weights([(name, tensor)])
    with pytest.raises(RuntimeError, match="have not been re-synced"):
        engine.generate([_probe()], [1.0], n=1, max_new_tokens=2)
    engine.update_weights(base.state_dict().items())
    engine.wake_up()
    torch.cuda.synchronize()
    free_again, _ = torch.cuda.mem_get_info()
    assert abs(free_again - free_awake) < 0.05 * total
    probe = _probe()
    engine.verify_sync(probe, teacher_forced_logprobs(base, probe), atol=0.05)
