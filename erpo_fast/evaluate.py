"""Held-out evaluation: mean@k and pass@k.

    python -m erpo_fast.evaluate --model PATH --data PATH --k 4

mean@k is the mean reward over k samples per prompt; pass@k is the fraction of prompts solved at least once
in k samples. With n >= k samples per prompt, pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k)
(Chen et al., 2021), where c of the n samples are correct; with n == k it is the plain any-correct rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from math import comb

import numpy as np

from erpo_fast.prompting import decode_response, encode_prompts, stop_token_ids


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
             top_p: float | None = None, max_prompt_length: int | None = None) -> dict[str, float]:
    """Sample max(ks) responses per held-out record and score them; returns mean@k / pass@k per k."""
    if not records:
        raise ValueError("evaluation set is empty")
    n = max(ks)
    prompts = encode_prompts(tokenizer, [r.prompt for r in records], chat_template=chat_template,
                             max_length=max_prompt_length)
    stops = stop_token_ids(tokenizer, getattr(engine, "eos_token_id", None))  # the model's EOS list too
    samples = engine.generate(prompts, [temperature] * len(prompts), n, max_new_tokens, stop_token_ids=stops,
                              top_k=top_k, top_p=top_p, seed=seed)
    pairs = [(decode_response(tokenizer, s.token_ids), r.answer) for r, group in zip(records, samples)
             for s in group]
    keys = [f"heldout:{r.key}" for r, group in zip(records, samples) for _ in group]  # names verifier incidents
    rewards = np.asarray(reward_pool.score(pairs, keys=keys), dtype=np.float64).reshape(len(records), n)
    out = summarize(rewards, ks)
    out["num_prompts"] = len(records)
    out["response_tokens_mean"] = float(np.mean([len(s.token_ids) for g in samples for s in g]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erpo_fast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (with tokenizer)")
    parser.add_argument("--data", required=True, help=".jsonl/.parquet with prompt and answer fields")
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="k values (samples per prompt = max k)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--reward", choices=("auto", "arithmetic", "math"), default="auto",
                        help="auto: math-verify")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--rollout", choices=("native", "vllm"), default="native")
    parser.add_argument("--workers", type=int, default=2, help="verifier processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-response verification timeout (s)")
    args = parser.parse_args(argv)

    from erpo_fast.data import load_prompts
    from erpo_fast.errors import UserError
    from erpo_fast.models import load_model, resolve_dtype
    from erpo_fast.rewards import get_reward_fn
    from erpo_fast.rewards.pool import RewardPool
    from erpo_fast.rollout import make_engine

    try:
        if any(k < 1 for k in args.k):
            raise UserError(f"--k values must be >= 1, got {args.k}")
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {args.temperature}")
        records = load_prompts(args.data)
        model, tokenizer = load_model(args.model)
        engine = make_engine(args.rollout, model) if args.rollout == "native" else make_engine(
            "vllm", args.model, dtype=resolve_dtype("auto"))
        reward_fn = get_reward_fn("math" if args.reward == "auto" else args.reward)
        with RewardPool(reward_fn, num_workers=args.workers, timeout_s=args.timeout) as pool:
            result = evaluate(engine, tokenizer, records, reward_pool=pool, ks=args.k,
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              chat_template=not args.no_chat_template)
    except (UserError, ValueError, ImportError) as e:  # ValueError: e.g. an engine's own argument check
        print(f"erpo_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key:>24s}  {value:.4f}" if isinstance(value, float) else f"{key:>24s}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
