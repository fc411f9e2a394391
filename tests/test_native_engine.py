"""NativeEngine against Hugging Face transformers on tiny random-weight models built from configs.

References are independent of the engine: `model.generate(do_sample=False)` on each prompt alone (so
padding independence is tested too), a full teacher-forced forward for log-probs, and scipy's chi-square
test for the sampled distribution.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB as VOCAB
from conftest import tiny_causal_lm as _build

from erpo_fast.engines import NativeEngine, Sample


def _prompts(lengths=(5, 1, 9, 3, 10, 8, 4), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _teacher_forced_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float64 logits predicting each response token, from one full forward of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    return logits[len(prompt) - 1: len(prompt) + len(response) - 1]


CASES = [("llama", "fused", "sdpa"), ("qwen2-tied", "fused", "sdpa"), ("qwen3", "fused", "sdpa"),
         ("mistral", "fused", "sdpa"), ("llama", "hf", "sdpa"), ("qwen2-tied", "hf", "eager"), ("gemma", "hf", "sdpa")]


@pytest.mark.parametrize("kind,backend,attn", CASES)
def test_greedy_matches_hf_generate_each_prompt_alone(kind, backend, attn):
    model = _build(kind, attn)
    reference = _build(kind, attn)  # a separate copy: the fused backend re-binds parameters as views
    engine = NativeEngine(model, backend=backend)
    assert engine.backend == backend
    prompts = _prompts()
    out = engine.generate(prompts, [0.0] * len(prompts), n=2, max_new_tokens=12, stop_token_ids=[])
    assert len(out) == len(prompts) and all(len(group) == 2 for group in out)
    for prompt, group in zip(prompts, out):
        expected = _hf_greedy(reference, prompt, 12, eos=None)
        for sample in group:
            assert sample.token_ids == expected
            assert sample.finish_reason == "length"
            assert sample.logprobs == [0.0] * 12  # greedy: a point mass


@pytest.mark.parametrize("kind,backend", [("llama", "fused"), ("qwen2-tied", "fused"), ("llama", "hf")])
@pytest.mark.parametrize("compact_below", [0.0, 1.0])
def test_greedy_with_stop_token_matches_hf(kind, backend, compact_below):
    model, reference = _build(kind), _build(kind)
    engine = NativeEngine(model, backend=backend, compact_below=compact_below)
    prompts = _prompts((4, 7, 2, 6, 1, 8), seed=3)
    # A stop token that the first prompt's greedy continuation surely emits, at its 4th step.
    stop = _hf_greedy(reference, prompts[0], 10, eos=None)[3]
    out = engine.generate(prompts, [0.0] * len(prompts), n=1, max_new_tokens=10, stop_token_ids=[stop])
    reasons = []
    for prompt, (sample,) in zip(prompts, out):
        expected = _hf_greedy(reference, prompt, 10, eos=stop)
        assert sample.token_ids == expected
        stopped = stop in expected
        assert sample.finish_reason == ("stop" if stopped else "length")
        if stopped:  # the stop token is kept, as the last token
            assert expected.index(stop) == len(expected) - 1
        else:
            assert len(sample.token_ids) == 10
        reasons.append(sample.finish_reason)
    assert reasons[0] == "stop" and len(out[0][0].token_ids) <= 4


def test_default_stop_is_the_models_eos():
    model, reference = _build("llama"), _build("llama")
    prompt = _prompts((5,), seed=7)[0]
    eos = _hf_greedy(reference, prompt, 8, eos=None)[2]
    model.generation_config.eos_token_id = eos
    [[sample]] = NativeEngine(model).generate([prompt], [0.0], n=1, max_new_tokens=8)
    assert sample.finish_reason == "stop" and sample.token_ids[-1] == eos
    assert sample.token_ids == _hf_greedy(reference, prompt, 8, eos=eos)


@pytest.mark.parametrize("kind,backend", [("llama", "fused"), ("qwen2-tied", "fused"), ("qwen2-tied", "hf")])
def test_logprobs_equal_learner_recomputation_per_row_temperature(kind, backend):
    model, reference = _build(kind), _build(kind)
    engine = NativeEngine(model, backend=backend)
    prompts = _prompts((6, 2, 9, 4), seed=5)
    temps = [0.5, 1.0, 1.7, 0.0]
    out = engine.generate(prompts, temps, n=3, max_new_tokens=8, stop_token_ids=[], seed=11)
    for prompt, temp, group in zip(prompts, temps, out):
        for sample in group:
            logits = _teacher_forced_logits(reference, prompt, sample.token_ids)
            got = torch.tensor(sample.logprobs, dtype=torch.float64)
            if temp == 0.0:
                assert sample.token_ids == logits.argmax(-1).tolist()
                assert torch.equal(got, torch.zeros_like(got))
                continue
            want = torch.log_softmax(logits / temp, -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_logprobs_under_top_k_and_top_p_are_renormalised():
    model, reference = _build("llama"), _build("llama")
    prompts = _prompts((3, 5), seed=9)
    top_k, top_p, temp = [5, 0], [1.0, 0.7], 1.3
    out = NativeEngine(model).generate(prompts, [temp, temp], n=4, max_new_tokens=6, stop_token_ids=[],
                                       top_k=top_k, top_p=top_p, seed=2)
    for prompt, k, p, group in zip(prompts, top_k, top_p, out):
        for sample in group:
            z = _teacher_forced_logits(reference, prompt, sample.token_ids) / temp
            if k:
                z = z.masked_fill(z < z.topk(k, -1).values[:, -1:], float("-inf"))
            if p < 1.0:  # keep a token iff the mass of strictly more likely tokens is < p
                probs = z.softmax(-1)
                above = (probs[:, None, :] * (z[:, None, :] > z[:, :, None])).sum(-1)
                z = z.masked_fill(above >= p, float("-inf"))
            want = torch.log_softmax(z, -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.isfinite(want).all()  # every sampled token survived the filters
            torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)


def test_first_token_distribution_chi_square_two_temperatures_in_one_batch():
    from scipy.stats import chisquare

    model, reference = _build("qwen2-tied"), _build("qwen2-tied")
    prompts = _prompts((4, 7), seed=13)
    temps = [0.6, 1.6]
    draws = 6000
    out = NativeEngine(model).generate(prompts, temps, n=draws, max_new_tokens=1, stop_token_ids=[], seed=0)

    def p_value(samples, prompt, temp) -> float:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt])).logits[0, -1].double()
        expected = torch.softmax(logits / temp, -1) * draws
        observed = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=VOCAB).double()
        # Pool the rare tokens (expected count < 5) into one bin, as the test requires.
        rare = expected < 5
        obs = torch.cat([observed[~rare], observed[rare].sum()[None]])
        exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
        return float(chisquare(obs.numpy(), exp.numpy()).pvalue)

    for prompt, temp, group in zip(prompts, temps, out):
        assert p_value(group, prompt, temp) > 1e-3
    # Negative control: the same draws judged against the other row's temperature must be rejected.
    assert p_value(out[0], prompts[0], temps[1]) < 1e-6
    assert p_value(out[1], prompts[1], temps[0]) < 1e-6


def test_per_prompt_seeds_one_sampler_call_per_step_and_first_token_chi_square(monkeypatch):
    # Per-prompt seeds give every (prompt, sample, step) its own derived seed; the n samples of one prompt must
    # still be independent draws from its distribution, and the whole batch must take one sampler call a step.
    from scipy.stats import chisquare

    import erpo_fast.engines.native as native

    calls = []
    real = native.sample_tokens
    monkeypatch.setattr(native, "sample_tokens", lambda *a, **kw: calls.append(kw.get("seed")) or real(*a, **kw))
    model, reference = _build("qwen2-tied"), _build("qwen2-tied")
    prompts = _prompts((4, 7), seed=41)
    draws, steps = 3000, 3
    out = NativeEngine(model).generate(prompts, [0.7, 1.4], n=draws, max_new_tokens=steps, stop_token_ids=[],
                                       seed=[5, 6])
    assert len(calls) == steps and all(isinstance(s, torch.Tensor) and s.shape == (2 * draws,) for s in calls)
    assert all(len(set(s.tolist())) == 2 * draws for s in calls)  # a distinct seed for every row and step
    assert len({tuple(s.tolist()) for s in calls}) == steps

    def p_value(group, prompt, temp) -> float:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt])).logits[0, -1].double()
        expected = torch.softmax(logits / temp, -1) * draws
        observed = torch.bincount(torch.tensor([s.token_ids[0] for s in group]), minlength=VOCAB).double()
        rare = expected < 5  # pooled into one bin
        obs = torch.cat([observed[~rare], observed[rare].sum()[None]])
        exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
        return float(chisquare(obs.numpy(), exp.numpy()).pvalue)

    assert p_value(out[0], prompts[0], 0.7) > 1e-3 and p_value(out[1], prompts[1], 1.4) > 1e-3
    # Negative control: judged against the other temperature, the draws are rejected.
    assert p_value(out[0], prompts[0], 1.4) < 1e-6 and p_value(out[1], prompts[1], 0.7) < 1e-6


def test_n_samples_share_one_prefill_differ_and_reproduce_with_seed():
    model = _build("llama")
    engine = NativeEngine(model)
    prefill_rows = []
    original = engine.runner.prefill

    def recording_prefill(ids, lengths, cache):
        prefill_rows.append((cache.prefill_prompts.tolist(), cache.rows))
        return original(ids, lengths, cache)

    engine.runner.prefill = recording_prefill
    prompts = _prompts((5, 3, 8), seed=17)
    first = engine.generate(prompts, [1.0, 1.2, 0.9], n=4, max_new_tokens=16, stop_token_ids=[], seed=123)
    # Each prompt is prefilled exactly once (in length buckets), into a cache of 3 x 4 sample rows.
    assert sorted(i for batch, _ in prefill_rows for i in batch) == [0, 1, 2]
    assert {rows for _, rows in prefill_rows} == {12}
    for group in first:
        assert len({tuple(s.token_ids) for s in group}) > 1
    again = engine.generate(prompts, [1.0, 1.2, 0.9], n=4, max_new_tokens=16, stop_token_ids=[], seed=123)
    assert again == first
    other = engine.generate(prompts, [1.0, 1.2, 0.9], n=4, max_new_tokens=16, stop_token_ids=[], seed=124)
    assert other != first


def test_compaction_and_chunking_keep_samples_correct():
    prompts = _prompts((5, 3, 8, 2), seed=19)
    stops = list(range(3, VOCAB, 12))  # about 1 token in 12 stops: rows finish at staggered steps
    seeds = [101, 202, 303, 404]
    reference = _build("qwen2-tied")
    layouts = ({"compact_below": 0.0}, {"compact_below": 1.0}, {"max_batch_rows": 3})
    outputs = []
    for kwargs in layouts:
        engine = NativeEngine(_build("qwen2-tied"), **kwargs)
        decode_rows = []
        original = engine.runner.decode
        engine.runner.decode = (lambda tokens, cache, seen=decode_rows, run=original:
                                seen.append(tokens.shape[0]) or run(tokens, cache))
        out = engine.generate(prompts, [1.0] * 4, n=3, max_new_tokens=12, stop_token_ids=stops, seed=seeds)
        outputs.append(out)
        assert {s.finish_reason for group in out for s in group} == {"stop", "length"}
        if kwargs.get("compact_below") == 0.0:
            assert set(decode_rows) == {12}  # finished rows ride along
        elif kwargs.get("compact_below") == 1.0:  # finished rows leave the batch as soon as they stop
            assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[-1] < 12
        for prompt, group in zip(prompts, out):
            for s in group:
                if s.finish_reason == "stop":
                    assert s.token_ids[-1] in stops and not set(s.token_ids[:-1]) & set(stops)
                else:
                    assert len(s.token_ids) == 12 and not set(s.token_ids) & set(stops)
                want = torch.log_softmax(_teacher_forced_logits(reference, prompt, s.token_ids), -1)
                want = want.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
                torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)
    # With one seed per prompt, a prompt's samples depend on nothing else: not on compaction, chunking, or
    # which prompts share the batch. (Log-probs agree to rounding: batch shapes change the matmul blocking.)
    alone = NativeEngine(_build("qwen2-tied")).generate(prompts[2:3], [1.0], n=3, max_new_tokens=12,
                                                        stop_token_ids=stops, seed=seeds[2:3])
    for other in (outputs[1], outputs[2], outputs[0][:2] + alone + outputs[0][3:]):
        for group_a, group_b in zip(outputs[0], other):
            for a, b in zip(group_a, group_b):
                assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    greedy = [NativeEngine(_build("qwen2-tied"), **kwargs).generate(prompts, [0.0] * 4, n=2, max_new_tokens=20,
                                                                    stop_token_ids=stops)
              for kwargs in layouts]
    assert greedy[0] == greedy[1] == greedy[2]


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied"])
def test_update_weights_loads_another_model_and_rejects_bad_names(kind):
    engine = NativeEngine(_build(kind, seed=0))
    target = _build(kind, seed=1)
    prompts = _prompts((4, 6), seed=23)
    before = engine.generate(prompts, [0.0, 0.0], n=1, max_new_tokens=8, stop_token_ids=[])
    loaded = engine.update_weights(target.state_dict().items())  # tied models list lm_head.weight too
    assert loaded == len(target.state_dict())
    after = engine.generate(prompts, [0.0, 0.0], n=1, max_new_tokens=8, stop_token_ids=[])
    assert after != before
    for prompt, (sample,) in zip(prompts, after):
        assert sample.token_ids == _hf_greedy(target, prompt, 8, eos=None)
    name, tensor = next(iter(target.state_dict().items()))
    with pytest.raises(KeyError, match="no parameter named"):
        engine.update_weights([("model.not_a_layer.weight", tensor)])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([(name, tensor[:-1])])


def test_engine_refuses_stale_fusion_after_parameters_are_rebound():
    # Re-binding parameters behind the engine's back (what model.to() does) must not leave it decoding with
    # stale fused weights: the engine notices and re-fuses.
    model, target = _build("llama", seed=0), _build("llama", seed=2)
    engine = NativeEngine(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = target.get_parameter(name).detach().clone()
    prompt = _prompts((5,), seed=29)[0]
    [[sample]] = engine.generate([prompt], [0.0], n=1, max_new_tokens=8, stop_token_ids=[])
    assert sample.token_ids == _hf_greedy(target, prompt, 8, eos=None)


def test_sleep_and_wake_up():
    engine = NativeEngine(_build("llama"))
    prompts = _prompts((3,), seed=31)
    before = engine.generate(prompts, [0.0], n=1, max_new_tokens=5, stop_token_ids=[])
    engine.sleep()
    assert engine.is_sleeping
    # generate wakes the engine itself (the engine owns its life cycle), with the weights unchanged.
    assert engine.generate(prompts, [0.0], n=1, max_new_tokens=5, stop_token_ids=[]) == before
    assert not engine.is_sleeping
    engine.sleep()
    engine.wake_up()
    assert not engine.is_sleeping
    assert engine.generate(prompts, [0.0], n=1, max_new_tokens=5, stop_token_ids=[]) == before


def test_bad_arguments_raise_clear_errors():
    engine = NativeEngine(_build("llama"))
    ok = _prompts((3, 2))
    bad_calls = [
        (dict(prompts=[], temperatures=[]), "non-empty"),
        (dict(prompts=[[1, 2], []], temperatures=[1.0, 1.0]), "empty"),
        (dict(prompts=[[1, VOCAB]], temperatures=[1.0]), "outside"),
        (dict(prompts=ok, temperatures=[1.0]), "one per prompt"),
        (dict(prompts=ok, temperatures=[1.0, -0.5]), ">= 0"),
        (dict(prompts=ok, temperatures=[1.0, 1.0], n=0), "positive"),
        (dict(prompts=ok, temperatures=[1.0, 1.0], max_new_tokens=0), "positive"),
        (dict(prompts=ok, temperatures=[1.0, 1.0], top_p=1.5), "top_p"),
        (dict(prompts=ok, temperatures=[1.0, 1.0], top_k=[1, 2, 3]), "top_k"),
        (dict(prompts=ok, temperatures=[1.0, 1.0], seed=[1]), "one per prompt"),
    ]
    for kwargs, message in bad_calls:
        args = dict(n=1, max_new_tokens=2) | kwargs
        with pytest.raises(ValueError, match=message):
            engine.generate(**args)
    with pytest.raises(ValueError, match="fused backend"):
        NativeEngine(_build("gemma"), backend="fused")
    with pytest.raises(ValueError, match="backend"):
        NativeEngine(_build("llama"), backend="turbo")


def test_sample_is_a_checked_record():
    assert Sample([1, 2], [-0.5, -0.1], "stop").finish_reason == "stop"
    with pytest.raises(ValueError, match="log-probs"):
        Sample([1, 2], [-0.5], "stop")
    with pytest.raises(ValueError, match="finish_reason"):
        Sample([1], [-0.5], "eos")
