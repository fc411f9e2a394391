"""Held-out evaluation: mean@k and pass@k.

    python -m erpo_fast.evaluate --model PATH --data PATH --k 4
    python -m erpo_fast.evaluate --model BASE --adapter ADAPTER_DIR --data PATH    (a LoRA policy)

mean@k is the mean reward over k samples per prompt; pass@k is the fraction of prompts solved at least once
in k samples. With n >= k samples per prompt, pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k)
(Chen et al., 2021), where c of the n samples are correct; with n == k it is the plain any-correct rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from math import comb

import numpy as np

from erpo_fast import choices as C
from erpo_fast.prompting import decode_response, encode_prompts, stop_token_ids
from erpo_fast.rewards.pool import check_not_all_failed


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def summarize(rewards: np.ndarray, ks: Sequence[int], success_threshold: float = 1.0) -> dict[str, float]:
    """rewards [P, n] -> {"mean_at_k": ..., "pass_at_k": ...} for each k (mean@k averages all n samples)."""
    correct = (rewards >= success_threshold).sum(axis=1)
    n = rewards.shape[1]
    out = {}
    for k in ks:
        out[f"mean_at_{k}"] = float(rewards.mean())
        out[f"pass_at_{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    return out


def evaluate(engine, tokenizer, records, *, reward_pool, ks: Sequence[int] = (4,), temperature: float = 1.0,
             max_new_tokens: int = 512, seed: int = 0, chat_template: bool = True, top_k: int | None = None,
             top_p: float | None = None, max_prompt_length: int | None = None, batch_prompts: int = 64,
             on_progress: Callable[[int], object] | None = None, success_threshold: float = 1.0
             ) -> dict[str, float]:
    """Sample max(ks) responses per held-out record and score them; returns mean@k / pass@k per k.

    Prompts go to the engine ``batch_prompts`` at a time, each with its own seed (``seed + i`` for record i), so
    the samples do not depend on the batching; ``on_progress(prompts_done)`` is called after each batch.
    """
    if not records:
        raise ValueError("evaluation set is empty")
    n = max(ks)
    prompts = encode_prompts(tokenizer, [r.prompt for r in records], chat_template=chat_template,
                             max_length=max_prompt_length, origins=[r.origin for r in records])
    stops = stop_token_ids(tokenizer, getattr(engine, "eos_token_id", None))  # the model's EOS list too
    rewards = np.zeros((len(records), n), dtype=np.float64)
    lengths, scored, failed, first_failure = [], 0, 0, None
    for start in range(0, len(records), batch_prompts):
        end = min(start + batch_prompts, len(records))
        samples = engine.generate(prompts[start:end], [temperature] * (end - start), n, max_new_tokens,
                                  stop_token_ids=stops, top_k=top_k, top_p=top_p,
                                  seed=[seed + i for i in range(start, end)])
        pairs = [(decode_response(tokenizer, s.token_ids), r.answer) for r, group in zip(records[start:end], samples)
                 for s in group]
        keys = [f"heldout:{r.key}" for r, group in zip(records[start:end], samples) for _ in group]
        rewards[start:end] = np.asarray(reward_pool.score(pairs, keys=keys), dtype=np.float64).reshape(-1, n)
        stats = reward_pool.last_stats
        scored, failed = scored + stats.num_scored, failed + stats.num_failed
        first_failure = first_failure or stats.first_failure()
        lengths += [len(s.token_ids) for g in samples for s in g]
        if on_progress is not None:
            on_progress(end - start)
    # A verifier that failed on every held-out response is broken, not strict.
    check_not_all_failed(reward_pool.name, scored, failed, first_failure, "held-out evaluation")
    out = summarize(rewards, ks, success_threshold)
    out["num_prompts"] = len(records)
    out["seed"] = seed  # with the model, k, temperature and max_new_tokens: all it takes to reproduce these
    out["response_tokens_mean"] = float(np.mean(lengths))
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m erpo_fast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="local Hugging Face model directory (with tokenizer), or a LoRA checkpoint's model/ "
                             "folder (its base model is the one its adapter_config.json names)")
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapters (a PEFT folder, e.g. a LoRA checkpoint's model/) applied to --model")
    parser.add_argument("--data", required=True, help=".jsonl/.parquet with prompt and answer fields")
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="k values (samples per prompt = max k)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--reward", default="auto",
                        help="as data.reward: auto (math-verify), arithmetic, math, module:function or "
                             "path/file.py:function")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--success-threshold", type=float, default=1.0,
                        help="a reward >= this counts as solved for pass@k (as algorithm.success_threshold)")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--rollout", choices=C.ENGINES, default="native")
    parser.add_argument("--workers", type=int, default=2, help="verifier processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-response verification timeout (s)")
    return parser


def _base_and_adapter(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model folder, adapter folder or None): --model may itself be an adapter folder (a LoRA checkpoint's
    model/), whose adapter_config.json names its base."""
    from erpo_fast.errors import UserError
    from erpo_fast.lora import is_adapter_dir, read_adapter_config

    if adapter is None and is_adapter_dir(model):
        base = read_adapter_config(model).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{model} holds LoRA adapters without a base model name; pass the base as --model and "
                            "this folder as --adapter")
        return base, model
    if adapter is not None and not is_adapter_dir(adapter):
        raise UserError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return model, adapter


def _lora_engine(kind: str, model, base: str, adapter: str):
    """An engine that samples with the adapters: the native engine applies them in its forward; vLLM serves them
    as a LoRARequest."""
    from erpo_fast.engines import make_engine
    from erpo_fast.lora import adapter_model_config, adapter_weights, add_adapters, load_adapters
    from erpo_fast.models import resolve_dtype

    cfg = adapter_model_config(adapter)
    add_adapters(model, cfg)
    load_adapters(model, adapter)
    if kind == "native":
        return make_engine("native", model)
    engine = make_engine("vllm", base, dtype=resolve_dtype("auto"), lora=cfg)
    engine.update_adapters(adapter_weights(model))
    return engine


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    from erpo_fast.data import load_prompts
    from erpo_fast.engines import make_engine
    from erpo_fast.errors import TrainingAborted, UserError
    from erpo_fast.logger import Progress
    from erpo_fast.models import load_model, resolve_dtype
    from erpo_fast.rewards import get_reward_fn
    from erpo_fast.rewards.pool import RewardPool

    try:
        if any(k < 1 for k in args.k):
            raise UserError(f"--k values must be >= 1, got {args.k}")
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {args.temperature}")
        reward_name = "math" if args.reward == "auto" else args.reward
        reward_fn = get_reward_fn(reward_name)  # a spec that does not import fails before the model loads
        records = load_prompts(args.data)
        base, adapter = _base_and_adapter(args.model, args.adapter)
        model, tokenizer = load_model(base)
        if adapter is None:
            engine = make_engine(args.rollout, model) if args.rollout == "native" else make_engine(
                "vllm", base, dtype=resolve_dtype("auto"))
        else:
            engine = _lora_engine(args.rollout, model, base, adapter)
        with RewardPool(reward_fn, num_workers=args.workers, timeout_s=args.timeout, name=reward_name) as pool, \
                Progress(len(records), "evaluate (prompts)") as progress:
            result = evaluate(engine, tokenizer, records, reward_pool=pool, ks=args.k,
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              chat_template=not args.no_chat_template, on_progress=progress.update,
                              success_threshold=args.success_threshold)
    except (UserError, ValueError, ImportError) as e:  # ValueError: e.g. an engine's own argument check
        print(f"erpo_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:  # e.g. a verifier that failed on every response
        print(f"erpo_fast.evaluate: stopped: {e}", file=sys.stderr)
        return 1
    for key, value in result.items():
        print(f"{key:>24s}  {value:.4f}" if isinstance(value, float) else f"{key:>24s}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
