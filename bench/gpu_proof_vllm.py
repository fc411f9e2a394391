"""P5 of bench/gpu_proof.py: the colocated vLLM engine, timed, in the proof script's child process.

One engine per process (vLLM's one-instance state). A random-weight Qwen2 (0.5B shapes on a GPU, tiny in the
rehearsal) is saved as safetensors with no tokenizer: ``skip_tokenizer_init`` (a 152k-vocabulary random model
has no tokenizer that covers every id, and the engine never detokenizes). On a GPU the sampler is pinned to
vLLM's own (``VLLM_USE_FLASHINFER_SAMPLER=0``: the carried wheels ship FlashInfer JIT-only) and the attention
backend to FLASH_ATTN unless ``VLLM_ATTENTION_BACKEND`` is set.

Steps: engine start; generate prompts x n x tokens with per-prompt seeds and without seeds (both timed: vLLM
draws seeded requests one by one); sleep (memory freed); a learner step on the samples (the engine's
processed log-probs give the mismatch metrics); reload the new weights; wake; verify_sync on a probe.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def _model_dir(proof, root: Path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if proof.cuda:
        hid, inter, layers, heads, kv, vocab = 896, 4864, 24, 14, 2, 151936
    else:  # head_dim 32: vLLM's CPU attention rejects 16
        hid, inter, layers, heads, kv, vocab = 128, 256, 2, 4, 2, 512
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hid, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                      max_position_embeddings=2048, eos_token_id=2, bos_token_id=1, initializer_range=0.05)
    torch.manual_seed(0)
    with torch.device(proof.device):
        model = Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16 if proof.cuda else torch.float32).save_pretrained(root)
    return model.float(), vocab


def run_colocated(proof) -> dict:
    import torch

    from bench.gpu_proof import goal
    from erpo_fast.batch import RolloutSequence
    from erpo_fast.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from erpo_fast.engines.base import verify_sync
    from erpo_fast.engines.vllm_engine import VLLMEngine, WeightSyncError, teacher_forced_logprobs
    from erpo_fast.learner import Learner

    if proof.cuda:
        os.environ.setdefault("VLLM_ATTENTION_BACKEND", "FLASH_ATTN")
        prompts, n, new_tokens, p_len = 32, 8, 256, 64
    else:
        prompts, n, new_tokens, p_len = 4, 2, 8, 8
    data, goals = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model, vocab = _model_dir(proof, Path(tmp))
        t0 = time.perf_counter()
        engine = VLLMEngine(tmp, dtype="bfloat16" if proof.cuda else "float32", gpu_memory_utilization=0.3,
                            max_model_len=p_len + new_tokens + 64, enforce_eager=True, sleep_level=2,
                            skip_tokenizer_init=True)
        data["engine_start_s"] = time.perf_counter() - t0
        try:
            g = torch.Generator().manual_seed(1)
            batch = [torch.randint(3, vocab, (p_len,), generator=g).tolist() for _ in range(prompts)]
            temps = [0.7 + 0.6 * i / prompts for i in range(prompts)]
            engine.generate(batch[:1], temps[:1], n=1, max_new_tokens=2, stop_token_ids=[])  # warm-up, untimed
            for label, seed in (("seeded", list(range(100, 100 + prompts))), ("unseeded", None)):
                t0 = time.perf_counter()
                samples = engine.generate(batch, temps, n=n, max_new_tokens=new_tokens, stop_token_ids=[], seed=seed)
                sec = time.perf_counter() - t0
                tokens = sum(len(s.token_ids) for group in samples for s in group)
                data[f"generate_{label}_s"] = sec
                data[f"tokens_per_s_{label}"] = tokens / sec
            data["seeded_vs_unseeded_tokens_per_s"] = data["tokens_per_s_seeded"] / data["tokens_per_s_unseeded"]

            free_before = torch.cuda.mem_get_info()[0] if proof.cuda else None
            t0 = time.perf_counter()
            engine.sleep()
            data["sleep_s"] = time.perf_counter() - t0
            if proof.cuda:
                data["sleep_freed_gib"] = (torch.cuda.mem_get_info()[0] - free_before) / 2**30

            learner = Learner(model, AlgorithmConfig(), TrainerConfig(micro_batch_size=prompts * n), ModelConfig(),
                              device=proof.device, max_len=new_tokens)
            seqs = [RolloutSequence(prompt_ids=batch[i], response_ids=s.token_ids, rollout_logprobs=s.logprobs,
                                    temperature=temps[i],
                                    advantage=float(torch.randn(1, generator=g)), seq_key=i * n + j)
                    for i, group in enumerate(samples) for j, s in enumerate(group)]
            t0 = time.perf_counter()
            metrics = learner.train_on(seqs)
            data["learner_step_s"] = time.perf_counter() - t0
            data["mismatch"] = {k: v for k, v in metrics.items() if k.startswith("mismatch_")}

            t0 = time.perf_counter()
            data["reloaded_tensors"] = engine.update_weights(learner.named_weights())
            data["reload_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.wake_up()
            data["wake_s"] = time.perf_counter() - t0
            swap = data["sleep_s"] + data["reload_s"] + data["wake_s"]
            goals["sleep + wake + reload <= 2 s"] = goal(swap, 2.0, swap <= 2.0, perf=True)

            probe = batch[0][:48]
            reference = teacher_forced_logprobs(learner.model, probe)
            try:
                stats = verify_sync(engine.prompt_logprobs(probe), reference, atol=0.05 if proof.cuda else 1e-3)
            except WeightSyncError as exc:
                stats = {"error": str(exc)[:300], "max_abs_diff": float("inf")}
            data["verify_sync"] = stats
            worst = stats["max_abs_diff"]
            goals["verify_sync max |d logp| <= 0.02"] = goal(worst, 0.02, worst <= 0.02)
        finally:
            engine.close()
    summary = (f"start {data['engine_start_s']:.1f} s, {data['tokens_per_s_seeded']:.0f} tok/s seeded vs "
               f"{data['tokens_per_s_unseeded']:.0f} unseeded, swap {swap:.2f} s, "
               f"sync max {data['verify_sync']['max_abs_diff']:.3g}")
    return {"data": data, "goals": goals, "summary": summary}

