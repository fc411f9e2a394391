"""VLLMEngine against independent references, on a real vLLM.

The `vllm` tests run wherever vLLM imports: vLLM's CPU build in .venv-vllm (scripts/test.sh runs them there,
in CI too) or a GPU machine. They build tiny random-weight checkpoints in a temporary directory (head_dim 32:
the CPU attention backend rejects 16) and compare vLLM with Hugging Face transformers and with our learner
on the same weights: fp32 on the CPU (tight tolerances), bf16 on a GPU (bf16 tolerances).
The first tests need no vLLM: they check the error path when it is missing.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from erpo_fast.engines import NativeEngine, VLLMEngine, make_engine
from erpo_fast.engines.base import verify_sync
from erpo_fast.engines.vllm_engine import INSTALL_HINT, WeightSyncError, request_seed, teacher_forced_logprobs

# ---- without vLLM ------------------------------------------------------------------------------------


def test_missing_vllm_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'erpo-fast\[vllm\]'"):
        VLLMEngine(tmp_path)
    with pytest.raises(ImportError, match="VLLMEngine needs vLLM"):
        make_engine("vllm", tmp_path)
    assert "erpo-fast[vllm]" in INSTALL_HINT and "vllm_env.sh" in INSTALL_HINT


def test_rollout_package_imports_without_vllm():
    import subprocess

    # A fresh interpreter where vLLM cannot be imported: erpo_fast and erpo_fast.engines still import,
    # and neither pulls vLLM in.
    code = ("import sys; sys.modules['vllm'] = None; import erpo_fast, erpo_fast.engines as r; "
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


def test_request_seeds_give_every_sample_its_own_stream():
    # vLLM seeds sample j of a request with seed + j: the requests of one call must not overlap.
    n = 8
    for prompt_seeds in ([5, 6, 7], [0, 1, 2, 3], [2**32 - 1, 0, 123456789]):
        streams = [request_seed(s, n) + j for s in prompt_seeds for j in range(n)]
        assert len(set(streams)) == len(streams)


# ---- with vLLM ---------------------------------------------------------------------------------------

VOCAB = 512
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = "bfloat16" if ON_GPU else "float32"
LOGPROB_ATOL = 0.3 if ON_GPU else 1e-4  # bf16 kernels vs an fp32 reference; fp32 vs fp32 on the CPU
SYNC_ATOL = 0.05 if ON_GPU else 1e-4


def _random_model(kind: str, seed: int, initializer_range: float = 0.05):
    """Tiny random-weight model: Qwen2 with tied embeddings, or Llama with an untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=initializer_range, eos_token_id=2, bos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "qwen2":
            return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common)).eval()


def _save(model, path):
    from erpo_fast.tokenizer import build_char_tokenizer

    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)  # ids < 512; vLLM loads a tokenizer by default
    return path


def _engine(model_dir):
    return VLLMEngine(model_dir, dtype=DTYPE, gpu_memory_utilization=0.2, max_model_len=256, enforce_eager=True,
                      sleep_level=2)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A vLLM engine on a tied-embedding Qwen2, and the same weights as an fp32 transformers model."""
    base = _random_model("qwen2", seed=0)
    engine = _engine(_save(base, tmp_path_factory.mktemp("qwen2")))
    yield engine, base.to(DEVICE)
    engine.close()  # vLLM keeps process-wide state: one engine at a time (tests/test_vllm_llama.py builds another)


def _probe(seed: int = 3, length: int = 24) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=DEVICE)).logits[0].double().cpu()


def _hf_greedy(model, prompt, steps) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(_hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def _learner(model):
    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.learner import Learner

    return Learner(copy.deepcopy(model).float(), AlgorithmConfig(), TrainerConfig(), ModelConfig(), device=DEVICE,
                   max_len=64)


def _chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    """Goodness of fit of sampled token ids to a distribution over the vocabulary (rare cells pooled)."""
    from scipy.stats import chisquare

    expected = probs.double() * len(tokens)
    observed = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    rare = expected < 5
    obs = torch.cat([observed[~rare], observed[rare].sum()[None]])
    exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.vllm
def test_generate_contract_and_processed_logprobs_match_the_learner(qwen):
    """Shapes and finish reasons, and every sampled token's log-prob equals the learner's recomputation at
    that row's temperature (what the importance ratio compares)."""
    from erpo_fast.batch import RolloutSequence

    engine, base = qwen
    prompts = [_probe(1, 7), _probe(2, 12), _probe(4, 5)]
    temps = [0.5, 1.0, 2.0]
    out = engine.generate(prompts, temps, n=3, max_new_tokens=10, stop_token_ids=[], seed=0)
    assert [len(group) for group in out] == [3, 3, 3]
    sequences = []
    for prompt, temp, group in zip(prompts, temps, out):
        for s in group:
            assert s.finish_reason == "length" and len(s.token_ids) == 10
            sequences.append(RolloutSequence(prompt, s.token_ids, s.logprobs, temp, 0.0, len(sequences)))
    ours = _learner(base).compute_logprobs(sequences, temperature="row")
    for seq, recomputed in zip(sequences, ours):
        diff = (torch.tensor(seq.rollout_logprobs) - recomputed.cpu()).abs()
        assert diff.max() <= LOGPROB_ATOL, (seq.temperature, diff)
    # A stop token ends a sample and is kept as its last token; greedy log-probs are a point mass.
    greedy = engine.generate([prompts[0]], [0.0], n=1, max_new_tokens=10, stop_token_ids=[])[0][0]
    stop = greedy.token_ids[3]
    stopped = engine.generate([prompts[0]], [0.0], n=1, max_new_tokens=10, stop_token_ids=[stop])[0][0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]
    assert stopped.logprobs == [0.0] * len(stopped.token_ids)


@pytest.mark.vllm
def test_per_prompt_temperature_first_token_chi_square(qwen):
    """Each row samples softmax(logits / T) of its own T, checked against transformers' logits."""
    engine, base = qwen
    prompt = _probe(5, 9)
    temps, draws = [0.5, 1.0, 2.0], 3000
    out = engine.generate([prompt] * 3, temps, n=draws, max_new_tokens=1, stop_token_ids=[], seed=11)
    logits = _hf_logits(base, prompt)[-1]
    for temp, group in zip(temps, out):
        tokens = [s.token_ids[0] for s in group]
        assert _chi_square_p(tokens, torch.softmax(logits / temp, -1)) > 1e-3, temp
        for other in temps:
            if other != temp:
                assert _chi_square_p(tokens, torch.softmax(logits / other, -1)) < 1e-6, (temp, other)


@pytest.mark.vllm
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (20, 0.8)])
def test_top_k_top_p_support_logprobs_and_distribution(qwen, top_k, top_p):
    from erpo_fast.kernels.sampling.naive import processed_logprobs_reference

    engine, base = qwen
    prompt, temp, draws = _probe(6, 8), 1.3, 2000
    out = engine.generate([prompt], [temp], n=draws, max_new_tokens=1, stop_token_ids=[], seed=5,
                          top_k=top_k or None, top_p=top_p if top_p < 1 else None)[0]
    logits = _hf_logits(base, prompt)[-1:]
    reference = processed_logprobs_reference(logits, torch.tensor([temp]), torch.tensor([top_k]),
                                             torch.tensor([top_p]))[0]
    tokens = [s.token_ids[0] for s in out]
    kept = torch.isfinite(reference)
    assert kept[tokens].all(), "a token outside top-k/top-p was sampled"
    got = torch.tensor([s.logprobs[0] for s in out], dtype=torch.float64)
    assert (got - reference[tokens]).abs().max() <= LOGPROB_ATOL
    assert _chi_square_p(tokens, reference.exp()) > 1e-3
    # Control: the unfiltered distribution does not fit when the filter removed real mass.
    assert _chi_square_p(tokens, torch.softmax(logits[0] / temp, -1)) < 1e-6


def _check_update(engine, old, new, probe):
    engine.sleep()  # the colocated step: the learner runs while the engine sleeps, then the sync
    engine.update_weights(new.named_parameters())
    stats = verify_sync(engine.prompt_logprobs(probe), teacher_forced_logprobs(new, probe), atol=SYNC_ATOL)
    assert stats["mean_abs_diff"] <= SYNC_ATOL
    with pytest.raises(WeightSyncError, match="not sampling from the synced weights"):
        verify_sync(engine.prompt_logprobs(probe), teacher_forced_logprobs(old, probe), atol=SYNC_ATOL)
    greedy = engine.generate([probe], [0.0], n=1, max_new_tokens=8, stop_token_ids=[])[0][0].token_ids
    if ON_GPU:  # bf16: every chosen token is the new model's argmax, up to near-ties
        logits = _hf_logits(new, probe + greedy)[len(probe) - 1: -1]
        chosen = logits.gather(1, torch.tensor(greedy)[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max() < 0.1
    else:
        assert greedy == _hf_greedy(new, probe, 8)
        assert greedy != _hf_greedy(old, probe, 8)


@pytest.mark.vllm
def test_update_weights_tied_qwen2_is_visible_and_verified(qwen):
    engine, base = qwen
    probe = _probe()
    verify_sync(engine.prompt_logprobs(probe), teacher_forced_logprobs(base, probe), atol=SYNC_ATOL)
    target = _random_model("qwen2", seed=1).to(DEVICE)
    _check_update(engine, base, target, probe)
    with pytest.raises(KeyError, match="no parameter named"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(RuntimeError, match="update_weights"):  # a failed update leaves no half-synced engine
        engine.generate([probe], [1.0], n=1, max_new_tokens=2)
    _check_update(engine, target, base, probe)  # back to the base weights for the other tests


@pytest.mark.vllm
def test_seeds_never_share_a_stream_and_reproduce(qwen):
    engine, _ = qwen
    prompt, n = _probe(8, 6), 6

    def run(seed, prompts=(prompt, prompt)):
        out = engine.generate(list(prompts), [1.0] * len(prompts), n=n, max_new_tokens=8, stop_token_ids=[],
                              seed=seed)
        return [[tuple(s.token_ids) for s in group] for group in out]

    for seed in (21, [40, 41]):  # an int seed (prompt i: seed + i), and consecutive per-prompt seeds
        first, second = run(seed)
        # The same prompt twice in one call: 2n independent samples, no (prompt, sample) pair repeated.
        assert len(set(first) | set(second)) == 2 * n, (first, second)
        assert run(seed) == [first, second]  # the same call again gives the same samples
    # Per-prompt seeds: a prompt's samples do not depend on what else is in the batch.
    alone = run([40], prompts=(prompt,))
    assert alone[0] == run([40, 41])[0]


@pytest.mark.vllm
def test_life_cycle_sleep_and_wake(qwen):
    engine, base = qwen
    probe = _probe(9)
    greedy = engine.generate([probe], [0.0], n=1, max_new_tokens=6, stop_token_ids=[])
    engine.sleep()
    assert engine.is_sleeping
    if engine.sleep_mode:  # a level-2 sleep discarded the weights: generate refuses until a full sync
        with pytest.raises(RuntimeError, match="re-synced"):
            engine.generate([probe], [0.0], n=1, max_new_tokens=6)
        engine.update_weights(base.named_parameters())
    else:  # no sleep mode (CPU build): sleep is a no-op that keeps the weights
        assert engine.platform == "cpu"
    assert engine.generate([probe], [0.0], n=1, max_new_tokens=6, stop_token_ids=[]) == greedy
    assert not engine.is_sleeping
    engine.sleep(level=1)
    engine.wake_up()
    assert not engine.is_sleeping
    verify_sync(engine.prompt_logprobs(probe), teacher_forced_logprobs(base, probe), atol=SYNC_ATOL)


@pytest.mark.vllm
@pytest.mark.gpu
def test_gpu_sleep_frees_memory_and_level2_needs_full_resync(qwen):
    engine, base = qwen
    engine.wake_up()
    torch.cuda.synchronize()
    free_awake, total = torch.cuda.mem_get_info()
    engine.sleep()
    torch.cuda.synchronize()
    free_asleep, _ = torch.cuda.mem_get_info()
    # gpu_memory_utilization=0.2: most of it is KV cache, all of it is released.
    assert free_asleep - free_awake > 0.1 * total
    name, tensor = next(iter(base.named_parameters()))
    engine.update_weights([(name, tensor)])
    with pytest.raises(RuntimeError, match="have not been re-synced"):
        engine.generate([_probe()], [1.0], n=1, max_new_tokens=2)
    engine.update_weights(base.named_parameters())
    engine.wake_up()
    torch.cuda.synchronize()
    free_again, _ = torch.cuda.mem_get_info()
    assert abs(free_again - free_awake) < 0.05 * total
    verify_sync(engine.prompt_logprobs(_probe()), teacher_forced_logprobs(base, _probe()), atol=SYNC_ATOL)


@pytest.mark.vllm
def test_native_and_vllm_agree_on_the_same_weights(qwen):
    from scipy.stats import chi2_contingency

    engine, base = qwen
    native = NativeEngine(copy.deepcopy(base).float(), device=DEVICE)
    prompts = [_probe(s, 5 + s) for s in range(4)]
    want = native.generate(prompts, [0.0] * 4, n=1, max_new_tokens=10, stop_token_ids=[])
    got = engine.generate(prompts, [0.0] * 4, n=1, max_new_tokens=10, stop_token_ids=[])
    if not ON_GPU:
        assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]
    # Sampled first tokens at T=1.2 come from one distribution (two-sample chi-square on the common support).
    draws = 3000
    a = [s.token_ids[0] for s in native.generate([prompts[0]], [1.2], n=draws, max_new_tokens=1,
                                                  stop_token_ids=[], seed=3)[0]]
    b = [s.token_ids[0] for s in engine.generate([prompts[0]], [1.2], n=draws, max_new_tokens=1,
                                                  stop_token_ids=[], seed=3)[0]]
    counts = torch.stack([torch.bincount(torch.tensor(x), minlength=VOCAB) for x in (a, b)]).double()
    common = counts.sum(0) >= 10
    table = torch.cat([counts[:, common], counts[:, ~common].sum(1, keepdim=True)], 1)
    assert chi2_contingency(table.numpy()).pvalue > 1e-3
