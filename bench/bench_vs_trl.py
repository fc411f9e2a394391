"""erpo-fast's trainer against Hugging Face TRL's ``GRPOTrainer`` on the same model, data and settings (CPU).

Both trainers run the same work per step: ``--prompts-per-step`` prompts (default 16) x 8 samples, full-length
completions forced, fp32, one torch thread, no KL (no reference model), DAPO loss (token mean, clip 0.2 / 0.28),
micro-batch ``--micro-batch`` sequences (default 32; TRL: ``per_device_train_batch_size``, with gradient
accumulation over the step, one generation per optimizer step), the same reward function in-process
(:func:`parity_reward`: about half the completions score 1, so nearly every group has signal and no trainer could
skip zero-advantage work), lr 1e-6, AdamW, and the same activation-checkpointing setting (``--checkpointing``,
default off; TRL 1.16's ``GRPOConfig`` defaults it to on, which the bench overrides). Models are random-weight
Qwen2s (C: a Llama) built from configs and saved with a word-level tokenizer made offline with ``tokenizers``:

- ``A``: hidden 128, 4 layers, 4 heads (2 KV), MLP 384, vocabulary 1,024, 32 new tokens;
- ``B``: hidden 256, 2 layers, 4 heads (2 KV), MLP 768, vocabulary 151,936, 64 new tokens;
- ``C``: SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads (3 KV), MLP 1536, vocabulary 49,152, tied;
- ``D``: Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads (2 KV), MLP 4864, vocabulary 151,936, tied.

Prompts (``--prompts``): random letters, one token each, of ``var16-40`` (16-40 tokens, the original regime),
``fixed15`` (15 tokens: nothing for padding to waste, little for prompt sharing to save) or ``gsm60-200``
(60-200 tokens, GSM8K-like). TRL left-pads each batch's prompts to its longest; erpo-fast packs without padding
and runs a group's prompt once.

Forcing full length: TRL gets ``generation_kwargs={"min_new_tokens": N}`` (transformers then never samples
EOS early); our engine is called with no stop tokens. Either way every completion has exactly N tokens, so
the learners see identical shapes (checked: tokens per step are reported).

Each (model, contender) runs in its own subprocess, so that peak RSS (``ru_maxrss``) is that trainer's alone;
contenders alternate (ours, TRL, TRL, ours, ...) over ``--rounds`` rounds. A subprocess runs
``--warmup`` untimed steps then ``--steps`` timed ones; s/step is the median over all timed steps of all
rounds. "generation" is the time inside the engine (ours) or ``model.generate`` (TRL); "score" the verifier
calls; "learning" the rest of the step (advantages, learner, weight sync, TRL's bookkeeping).

Where the time goes (``--profile``): each timed step runs under ``torch.profiler`` (CPU operators, no shapes
or stacks), and the JSON gets, per contender and phase (generation: inside the engine / ``model.generate``;
learning: the rest), the self time of the dense matrix products (``aten::mm``/``addmm``/``bmm``/``baddbmm``,
oneDNN's ``_linear_pointwise``) and of the fused attention kernels (``scaled_dot_product_*``). The profiler's
own overhead is in those steps' times, so a profiled run's s/step is not the timing run's. Our learner's model
FLOPs over its matrix-product time is the rate its GEMMs run at; the matrix-product time alone is what a step
would cost with every other operator free.

LoRA (``--lora R``): the contenders become erpo-fast full fine-tuning, erpo-fast with LoRA rank R and TRL with the
same PEFT config (``peft.LoraConfig(r=R, lora_alpha=2R, target_modules="all-linear")``, GRPOTrainer's
``peft_config``); ours: ``model.lora_rank R``, ``model.lora_alpha 2R``, the engine applying the adapters it shares
with the learner (``rollout.lora_sync`` auto). ``bench/bench_lora.py sync`` times the weight sync itself.

Run: ``python -m bench.bench_vs_trl [--models A B] [--prompts var16-40 fixed15] [--checkpointing off]
[--rounds 2] [--steps 2] [--warmup 1] [--tag T]`` from the repository root (results:
``bench/results/vs_trl_<models>_<prompts>_ckpt-<on|off>[_<dtype>][_lora<r>][_<tag>]-cpu.json``); needs the
``bench`` extra (``pip install trl --no-deps`` plus its light dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `bench` and `erpo_fast` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    "A": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=384, vocab_size=1024, new_tokens=32),
    "B": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=768, vocab_size=151936, new_tokens=64),
    # Real shapes, random weights: SmolLM2-135M (a Llama) and Qwen2.5-0.5B (a Qwen2).
    "C": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, vocab_size=49152, new_tokens=64),
    "D": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, new_tokens=64),
}
# Prompt-length regimes (tokens; one letter = one token): the legacy 16-40, fixed 15 (no length spread for
# padding to waste, little for prompt sharing to save) and GSM8K-like 60-200.
PROMPT_LENGTHS = {"var16-40": (16, 40), "fixed15": (15, 15), "gsm60-200": (60, 200)}
PROMPTS_PER_STEP = 16
GROUP = 8
MICRO_BATCH = 32
NUM_PROMPTS = 256
LR = 1e-6
SPECIAL = ["<pad>", "<eos>", "<unk>"]


# --- shared model / data / reward (built once per model, in the parent) -------------------------------------

def parity_reward(response: str, answer: str) -> float:
    """1 for about half of all texts (a hash bit), so groups of 8 are almost never uniform."""
    return float(zlib.crc32(response.encode()) & 1)


def random_model(name: str):
    """Model ``name`` with random weights (seed 0) under sdpa attention, in memory: what the learner-only benches
    (bench_packed_attention --learner, bench_lean_layers) run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = {k: v for k, v in MODELS[name].items() if k not in ("new_tokens", "arch")}
    llama = MODELS[name].get("arch") == "llama"
    config = (LlamaConfig if llama else Qwen2Config)(**spec, tie_word_embeddings=True, max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return (LlamaForCausalLM if llama else Qwen2ForCausalLM)(config)


def build_assets(name: str, root: Path, prompts: str = "var16-40", new_tokens: int | None = None) -> dict:
    """Save the model + tokenizer folder and the prompt set for model ``name`` under ``root``."""
    import torch
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = MODELS[name]
    vocab_size = spec["vocab_size"]
    # Letters are single tokens (prompts use them); the rest of the vocabulary is filler the model can sample.
    # transformers loads any tokenizer saved beside a Qwen2 config as its Qwen2Tokenizer, which keeps a
    # one-character-per-token split but not a whitespace word split.
    words = SPECIAL + list(string.ascii_lowercase)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    arch = {k: v for k, v in spec.items() if k not in ("new_tokens", "arch")}
    if spec.get("arch") == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**arch, tie_word_embeddings=True, max_position_embeddings=2048, pad_token_id=0,
                             eos_token_id=1, bos_token_id=None, use_cache=True, rope_theta=100000.0)
        model_cls = LlamaForCausalLM
    else:
        config = Qwen2Config(**arch, tie_word_embeddings=True, max_position_embeddings=2048, pad_token_id=0,
                             eos_token_id=1, bos_token_id=None, use_cache=True)
        model_cls = Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    model_dir = root / f"model-{name}"
    if not (model_dir / "config.json").is_file():
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    # Prompts of random letters (one token each); the answer is never produced by a random model.
    lo, hi = PROMPT_LENGTHS[prompts]
    g = torch.Generator().manual_seed(1)
    data = root / f"prompts-{name}-{prompts}.jsonl"
    with data.open("w") as f:
        for i in range(NUM_PROMPTS):
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            text = "".join(string.ascii_lowercase[j] for j in torch.randint(0, 26, (n,), generator=g).tolist())
            f.write(json.dumps({"id": f"p{i}", "prompt": text, "answer": "42"}) + "\n")
    return {"model": name, "model_dir": str(model_dir), "data": str(data), "prompts": prompts,
            "prompt_tokens": [lo, hi], "new_tokens": new_tokens or spec["new_tokens"]}


# --- workers (one per subprocess) ----------------------------------------------------------------------------

def _peak_rss_bytes() -> int:
    """This process's own peak: VmHWM (reset by exec). ru_maxrss survives fork and exec, so a worker would
    report at least the peak of the driver that built the model (about 3 GB at model D)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


GENERATE_RANGE = "bench/generate"
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
                        "mkldnn::_linear_pointwise"})


def profiled(enabled: bool):
    """A CPU ``torch.profiler`` context (or a no-op one) for one timed step."""
    import contextlib

    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def op_seconds(prof) -> dict:
    """Self seconds of the matrix products and of the fused attention kernels, split by phase: generation (under
    a ``GENERATE_RANGE`` range) and learning (everything else in the step)."""
    out = {phase: {"matmul_s": 0.0, "attention_s": 0.0} for phase in ("generation", "learning")}
    for event in prof.events():
        kind = ("matmul_s" if event.name in MATMUL_OPS
                else "attention_s" if "scaled_dot_product" in event.name else None)
        if kind is None:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != GENERATE_RANGE:
            parent = parent.cpu_parent
        out["generation" if parent is not None else "learning"][kind] += event.self_cpu_time_total / 1e6
    return out


def run_ours(assets: dict, steps: int, warmup: int, out_dir: Path) -> dict:
    import torch

    from erpo_fast.config import build_config
    from erpo_fast.distributed import init_runtime
    from erpo_fast.session import build_session
    from erpo_fast.train import train_step

    threads = assets.get("threads", 1)
    torch.set_num_threads(threads)
    cfg = build_config("none", overrides={
        "model.path": assets["model_dir"], "model.dtype": assets.get("dtype", "float32"),
        "data.path": assets["data"], "data.reward": f"{Path(__file__).resolve()}:parity_reward",
        "data.reward_workers": 0, "data.chat_template": False,
        "rollout.n": GROUP, "rollout.max_new_tokens": assets["new_tokens"], "rollout.sync_check_every": 0,
        "algorithm.erpo": False, "algorithm.kl_beta": 0.0, "algorithm.loss_agg": "token_mean",
        "algorithm.eps_low": 0.2, "algorithm.eps_high": 0.28,
        "trainer.prompts_per_step": assets.get("prompts_per_step", PROMPTS_PER_STEP),
        "trainer.micro_batch_size": assets.get("micro_batch", MICRO_BATCH), "trainer.lr": LR,
        "trainer.max_steps": warmup + steps, "trainer.device": "cpu",
        "trainer.eval_every": 0, "trainer.save_every": 0, "trainer.output_dir": str(out_dir),
        "data.max_prompt_length": assets["prompt_tokens"][1], "trainer.threads": threads,
        "trainer.memory_budget_gb": 1000.0,  # the bench fixes the checkpointing setting; the plan must not
        # Freed activation memory goes back to the OS, as before trainer.cpu_heap existed: that huge budget would
        # make `auto` keep it for reuse, and peak RSS is compared here (release is the plan-faithful choice).
        "trainer.cpu_heap": "release",
        "model.gradient_checkpointing": assets.get("checkpointing", False),
        "logging.progress": False, "logging.plots": False, **assets.get("overrides", {})})
    if assets.get("lora"):
        cfg.model.lora_rank, cfg.model.lora_alpha = assets["lora"], 2.0 * assets["lora"]
    session = build_session(cfg, init_runtime("cpu"))
    learn_batches = []
    train_on = session.learner.train_on

    def recorded_train_on(batch):  # what the learner ran, for the FLOP count
        t0 = time.perf_counter()
        out = train_on(batch)
        learn_batches.append((time.perf_counter() - t0, list(batch.sequences)))
        return out

    session.learner.train_on = recorded_train_on
    generate = session.rollout.engine.generate

    def full_length(*args, **kwargs):  # forced full-length completions: no stop token
        kwargs["stop_token_ids"] = []
        with torch.profiler.record_function(GENERATE_RANGE):
            return generate(*args, **kwargs)

    session.rollout.engine.generate = full_length
    rows = []
    try:
        for step in range(1, warmup + steps + 1):
            with profiled(assets.get("profile") and step > warmup) as prof:
                m = train_step(session, step, None)
            learn_s, seqs = learn_batches[-1]
            rows.append({**({"ops": op_seconds(prof)} if prof is not None else {}),
                         "step_s": m["time_step_s"], "generation_s": m["time_rollout_s"], "score_s": m["time_score_s"],
                         "learner_s": m["time_learn_s"], "sync_s": m["time_sync_s"], "train_on_s": learn_s,
                         "tokens": round(m["tokens_per_s"] * m["time_step_s"]), "sequences": m["sequences_trained"],
                         "learner_flops": learner_flops(session, seqs),
                         **{k: m[k] for k in m if k.startswith("mismatch_")}})
    finally:
        session.close()
    plan = session.memory_plan
    return {"steps": rows[warmup:], "peak_rss_bytes": _peak_rss_bytes(), "plan_peak_bytes": plan.peak,
            "plan_terms": plan.terms, "plan_phases": plan.phases, "plan_micro_batch_tokens": plan.micro_batch_tokens}


def learner_flops(session, sequences) -> dict:
    """Model FLOPs of one learner step on ``sequences``: 6 x decoder parameters x packed tokens (prompts run
    through the decoder too; a shared prompt once per micro-batch), 6 x V x H per trained token (the fused LM
    head: logits, grad hidden, grad weight), and causal attention 6 x H x L^2 per layer and sequence, where a
    group's prompt whose attention runs once (``shares_prompt_attention``, CPU) counts once: 6 x H x P^2 for the
    prompt, then 6 x H x (2 R P + R^2) per response."""
    from itertools import groupby

    from erpo_fast.batch import micro_batches, packed_length
    from erpo_fast.packed_attention import shares_prompt_attention

    learner = session.learner
    model = learner.model
    cfg = model.config
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    decoder_params = sum(p.numel() for p in model.parameters()) - vocab * hidden  # tied embedding excluded
    parts = micro_batches(sequences, max_sequences=learner.trainer.micro_batch_size,
                          max_tokens=learner.trainer.micro_batch_tokens, share_prompts=learner._packed)
    packed = sum(packed_length([sequences[i] for i in p], share_prompts=learner._packed) for p in parts)
    trained = sum(len(s.response_ids) for s in sequences)
    layers = cfg.num_hidden_layers
    attention = 0
    for part in parts:
        for _, run in groupby((sequences[i] for i in part), key=lambda s: s.prompt_ids):
            group = list(run)
            p, responses = len(group[0].prompt_ids), [len(s.response_ids) for s in group]
            shared = learner._packed and learner.device.type == "cpu" and shares_prompt_attention(
                p, max(responses), len(group))
            attention += (p * p + sum(2 * r * p + r * r for r in responses) if shared
                          else sum((p + r) ** 2 for r in responses))
    attention *= 6 * hidden * layers
    total = 6 * decoder_params * packed + 6 * vocab * hidden * trained + attention
    return {"total": total, "attention": attention, "packed_tokens": packed, "trained_tokens": trained,
            "decoder_params": decoder_params}


def run_trl(assets: dict, steps: int, warmup: int, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from erpo_fast.data import load_prompts

    torch.set_num_threads(assets.get("threads", 1))
    new_tokens = assets["new_tokens"]
    prompts, micro = assets.get("prompts_per_step", PROMPTS_PER_STEP), assets.get("micro_batch", MICRO_BATCH)
    records = load_prompts(assets["data"])
    dataset = Dataset.from_list([{"prompt": r.prompt, "answer": r.answer} for r in records])
    score_time = [0.0]

    def reward(prompts, completions, answer, **kwargs):  # the function our trainer runs
        t0 = time.perf_counter()
        out = [parity_reward(c, a) for c, a in zip(completions, answer)]
        score_time[0] += time.perf_counter() - t0
        return out

    tokenizer = AutoTokenizer.from_pretrained(assets["model_dir"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(assets["model_dir"], local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    args = GRPOConfig(
        output_dir=str(out_dir), max_steps=warmup + steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=prompts * GROUP // micro, num_generations=GROUP,
        max_completion_length=new_tokens, generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, num_iterations=1,
        use_cpu=True, bf16=assets.get("dtype") == "bfloat16", fp16=False, report_to="none", save_strategy="no",
        logging_steps=1,
        # TRL 1.16 turns gradient checkpointing ON by default; both contenders get the bench's one setting.
        gradient_checkpointing=assets.get("checkpointing", False),
        disable_tqdm=True, dataloader_num_workers=0, seed=0, log_completions=False)
    peft_config = None
    if assets.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=assets["lora"], lora_alpha=2 * assets["lora"], target_modules="all-linear",
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    gen_time = [0.0]
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(GENERATE_RANGE):
                return generate(*a, **k)
        finally:
            gen_time[0] += time.perf_counter() - t0

    model.generate = timed_generate
    rows = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.profiling = bool(assets.get("profile")) and state.global_step >= warmup  # a timed step
            self.prof = profiled(self.profiling)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
            gen_time[0] = score_time[0] = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            rows.append({"step_s": step_s, "generation_s": gen_time[0], "score_s": score_time[0],
                         "tokens": prompts * GROUP * new_tokens, "sequences": prompts * GROUP,
                         **({"ops": op_seconds(self.prof)} if self.profiling else {})})

    trainer.add_callback(StepTimer())
    trainer.train()
    return {"steps": rows[warmup:], "peak_rss_bytes": _peak_rss_bytes()}


def worker(contender: str, assets: dict, steps: int, warmup: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-vs-trl-{contender}-") as tmp:
        fn = run_ours if contender.startswith("erpo-fast") else run_trl
        if not contender.endswith("-lora"):
            assets = {**assets, "lora": 0}
        result = fn(assets, steps, warmup, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


# --- driver ------------------------------------------------------------------------------------------------

def run_worker(contender: str, assets: dict, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_vs_trl", "--worker", contender, "--assets", json.dumps(assets),
           "--steps", str(steps), "--warmup", str(warmup)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench_vs_trl: the {contender} worker failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarise(name: str, contender: str, runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    step_s = statistics.median(s["step_s"] for s in steps)
    gen_s = statistics.median(s["generation_s"] for s in steps)
    score_s = statistics.median(s["score_s"] for s in steps)
    learn_s = statistics.median(s["step_s"] - s["generation_s"] - s["score_s"] for s in steps)
    tokens = steps[0]["tokens"]
    row = {"model": name, "contender": contender, "s_per_step": step_s, "generation_s": gen_s, "score_s": score_s,
           "learning_s": learn_s,
           "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
           "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / 1e9,
           "step_times": [s["step_s"] for s in steps], "timed_steps": len(steps)}
    if "ops" in steps[0]:  # --profile: medians of the per-phase matmul and attention self times
        for phase in ("generation", "learning"):
            for kind in ("matmul_s", "attention_s"):
                row[f"{phase}_{kind}"] = statistics.median(s["ops"][phase][kind] for s in steps)
        row["matmul_s"] = row["generation_matmul_s"] + row["learning_matmul_s"]
    if "ops" in steps[0] and "learner_flops" in steps[0]:  # the rate our learner's matrix products run at
        row["learner_matmul_gflop_s"] = statistics.median(
            s["learner_flops"]["total"] / s["ops"]["learning"]["matmul_s"] / 1e9 for s in steps)
    return row


def _ratios(a: dict, b: dict) -> dict:
    return {"s_per_step": a["s_per_step"] / b["s_per_step"], "generation": a["generation_s"] / b["generation_s"],
            "learning": a["learning_s"] / b["learning_s"], "peak_rss": a["peak_rss_gb"] / b["peak_rss_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["A", "B"], choices=list(MODELS))
    parser.add_argument("--prompts", nargs="+", default=["var16-40"], choices=list(PROMPT_LENGTHS),
                        help="prompt-length regimes (tokens)")
    parser.add_argument("--checkpointing", choices=("off", "on"), default="off",
                        help="activation checkpointing, the same for both contenders (TRL's own default is on)")
    parser.add_argument("--new-tokens", type=int, default=0, help="completion length (0: the model's default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both contenders: fp32 master weights either way; bfloat16 is autocast "
                             "(ours: model.dtype bfloat16, a bf16 engine copy; TRL: bf16=True)")
    parser.add_argument("--prompts-per-step", type=int, default=PROMPTS_PER_STEP)
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="sequences per forward/backward")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two contenders")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess")
    parser.add_argument("--lora", type=int, default=0,
                        help="LoRA rank R: contenders erpo-fast (full), erpo-fast-lora and trl-lora (same PEFT config)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the timed steps: matmul and attention self time per phase (adds overhead)")
    parser.add_argument("--tag", default="", help="suffix of the results file name (keeps an earlier run's file)")
    parser.add_argument("--worker", choices=("erpo-fast", "trl", "erpo-fast-lora", "trl-lora"), help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.new_tokens < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup and --new-tokens >= 0")
    if (args.prompts_per_step * GROUP) % args.micro_batch:
        parser.error(f"--micro-batch must divide --prompts-per-step x {GROUP} (TRL's gradient accumulation)")
    if args.worker:
        worker(args.worker, json.loads(args.assets), args.steps, args.warmup)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        parser.exit(2, "bench_vs_trl: TRL is not installed; pip install trl --no-deps plus accelerate datasets "
                       "pandas (the 'bench' extra)\n")
    import trl

    from bench.common import print_table, write_results

    load_start = os.getloadavg()
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        for name in args.models:
            for regime in args.prompts:
                assets = dict(build_assets(name, Path(tmp), regime, new_tokens=args.new_tokens or None),
                              checkpointing=args.checkpointing == "on", prompts_per_step=args.prompts_per_step,
                              micro_batch=args.micro_batch, dtype=args.dtype, lora=args.lora, profile=args.profile)
                key = f"{name}/{regime}"
                contenders = ["erpo-fast", "erpo-fast-lora", "trl-lora"] if args.lora else ["erpo-fast", "trl"]
                runs = {c: [] for c in contenders}
                for r in range(args.rounds):
                    order = contenders if r % 2 == 0 else contenders[::-1]
                    for contender in order:
                        res = run_worker(contender, assets, args.steps, args.warmup)
                        runs[contender].append(res)
                        print(f"{key} round {r + 1} {contender}: steps "
                              + ", ".join(f"{s['step_s']:.2f}s" for s in res["steps"])
                              + f", peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
                summary = {c: summarise(name, c, runs[c]) for c in contenders}
                for row in summary.values():
                    row.update(prompts=regime, prompt_tokens=assets["prompt_tokens"], new_tokens=assets["new_tokens"])
                pairs = ([("erpo-fast-lora", "erpo-fast"), ("erpo-fast-lora", "trl-lora")] if args.lora
                         else [("erpo-fast", "trl")])
                ratios[key] = {f"{a} / {b}": _ratios(summary[a], summary[b]) for a, b in pairs}
                rows += list(summary.values())
                print_table(list(summary.values()), ["contender", "s_per_step", "generation_s", "score_s",
                                                     "learning_s", "tokens_per_s", "peak_rss_gb", "timed_steps"],
                            title=f"model {name}, prompts {regime} tokens, {assets['new_tokens']} new tokens, "
                                  f"checkpointing {args.checkpointing}, {args.dtype} (ratios: "
                                  + "; ".join(f"{pair}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
                                              for pair, r in ratios[key].items()) + ")")
                if args.profile:
                    print_table(list(summary.values()), ["contender", "generation_s", "generation_matmul_s",
                                                         "generation_attention_s", "learning_s", "learning_matmul_s",
                                                         "learning_attention_s", "learner_matmul_gflop_s"],
                                title=f"model {name}, prompts {regime}: self seconds of the matrix products and the "
                                      "fused attention kernels, per phase (profiled steps)")
    dtype_tag = "" if args.dtype == "float32" else f"_{args.dtype}"
    tags = (dtype_tag + (f"_lora{args.lora}" if args.lora else "") + ("_profile" if args.profile else "")
            + (f"_{args.tag}" if args.tag else ""))
    write_results(f"vs_trl_{''.join(args.models)}_{'_'.join(args.prompts)}_ckpt-{args.checkpointing}{tags}", {
        "trl": trl.__version__, "threads": 1, "rounds": args.rounds, "timed_steps_per_run": args.steps,
        "warmup_steps_per_run": args.warmup,
        "settings": {"prompts_per_step": args.prompts_per_step, "group": GROUP, "micro_batch": args.micro_batch,
                     "lr": LR, "loss": "DAPO token mean, eps 0.2/0.28", "kl": 0, "dtype": args.dtype,
                     "checkpointing": args.checkpointing, "lora_rank": args.lora, "profiled": args.profile,
                     "lora": "alpha 2R, all-linear, dropout 0; TRL: peft_config" if args.lora else None,
                     "prompt_regimes": {p: PROMPT_LENGTHS[p] for p in args.prompts},
                     "full_length": "TRL min_new_tokens=N; ours no stop tokens"},
        "models": {name: MODELS[name] for name in args.models},
        "rows": rows, "ratios": ratios,
        "notes": f"shared 2-core machine; load average {load_start} at start, {os.getloadavg()} at end; "
                 "each contender in its own subprocess (peak RSS is its own), alternated",
    })


if __name__ == "__main__":
    main()
