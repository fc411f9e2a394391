"""Warm start of the built-in tiny model: a short supervised stage on the task's worked solutions, cached.

RL from a random policy would see only all-wrong groups (zero signal). Supervised steps on worked solutions of
problems that are neither RL prompts nor held-out ones give a policy that has the task's procedure but still
errs, which is where GRPO and ERPO have something to learn: the stage stops at a target loss, and a start still
stuck on the loss plateau is replaced by a new initialisation (see `supervised_finetune` and bench/NOTES.md,
"Learning demo trials"). The result is an ordinary HF model folder (+ tokenizer) under the cache directory, keyed by
everything that determines it, written atomically and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from erpo_fast.batch import RolloutSequence, pack_sequences
from erpo_fast.config import MOVED, BuiltinConfig
from erpo_fast.kernels.fused_linear import linear_logprobs
from erpo_fast.logger import Progress
from erpo_fast.models import build_tiny_qwen2, last_hidden_state, lm_head_weight
from erpo_fast.prompting import encode_completion
from erpo_fast.tokenizer import build_char_tokenizer

log = logging.getLogger("erpo_fast")

CACHE_VERSION = 2  # bump when the warm-start recipe changes, so stale caches are not reused
LOSS_WINDOW = 50  # steps averaged for warm_start_target_loss: one batch's loss is too noisy to stop on
RESTART_SEED_STRIDE = 1000  # attempt k of the warm start initialises and samples with seed + k * stride


def cache_root() -> Path:
    return Path(os.environ.get("ERPO_FAST_CACHE", Path.home() / ".cache" / "erpo_fast"))


def warm_start_key(b: BuiltinConfig, chat_template: bool) -> str:
    """Hash of everything that determines the warm-started weights (the tiny-model and warm-start knobs under the
    names they had before the builtin section, so that caches made then stay valid)."""
    old_name = {new.partition(".")[2]: old.partition(".")[2] for old, new in MOVED.items()}
    fields = {old_name[k]: v for k, v in vars(b).items() if old_name.get(k, "").startswith(("tiny_", "warm_start_"))}
    fields.update(num_train=b.num_train, num_heldout=b.num_heldout, seed=b.seed, chat_template=chat_template,
                  version=CACHE_VERSION, torch=torch.__version__, task=b.task, task_levels=b.levels)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def builtin_model_for(cfg) -> Path:
    """The warm-started built-in model of a config (its builtin.* knobs), trained on first use."""
    from erpo_fast.tasks.builtin import splits

    return builtin_model_dir(cfg.builtin, cfg.data.chat_template,
                             lambda: splits(cfg.builtin, num_warm_start=cfg.builtin.warm_start_problems)[2])


def builtin_model_dir(b: BuiltinConfig, chat_template: bool, load_problems: Callable[[], list]) -> Path:
    """The warm-started built-in model's folder, training it first if the cache does not have it.
    `load_problems()` gives the worked problems; it is called only on a cache miss (drawing ~100k problems
    costs seconds that a cached run need not pay)."""
    target = cache_root() / "warm_start" / warm_start_key(b, chat_template)
    seed = b.seed
    if (target / "config.json").is_file():
        return target
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, b, seed)
    t0 = time.perf_counter()
    if b.warm_start_steps > 0:
        log.info("warm start of the built-in model: %d supervised steps, first use only (cached in %s)",
                 b.warm_start_steps, target)
        examples = [encode_completion(tokenizer, p.prompt, p.solution, chat_template=chat_template)
                    for p in load_problems()]
        left, attempt = b.warm_start_steps, 0
        while True:
            # A start that is still on the loss plateau after warm_start_restart_after steps is dropped for a new
            # initialisation: how long the plateau lasts depends on the start (bench/NOTES.md, "Learning demo trials").
            check = b.warm_start_restart_after
            final_loss, steps = supervised_finetune(
                model, examples, steps=left, lr=b.warm_start_lr,
                batch_size=b.warm_start_batch_size, weight_decay=b.warm_start_weight_decay,
                target_loss=b.warm_start_target_loss, seed=seed + RESTART_SEED_STRIDE * attempt,
                progress=True, give_up=(check, b.warm_start_restart_loss) if 0 < check < left else None)
            left -= steps
            if steps == b.warm_start_restart_after and final_loss > b.warm_start_restart_loss \
                    and left > 0:
                attempt += 1
                log.warning("warm start: loss %.3f after %d steps is still above %.2f; starting again from a new "
                            "initialisation (attempt %d, %d steps left)", final_loss, steps,
                            b.warm_start_restart_loss, attempt + 1, left)
                model = build_tiny_qwen2(tokenizer, b, seed + RESTART_SEED_STRIDE * attempt)
                continue
            break
        reached = 0 < final_loss < b.warm_start_target_loss
        log.info("warm start: %d SFT steps in %.1fs (%d restart(s)), final loss %.3f%s",
                 b.warm_start_steps - left, time.perf_counter() - t0, attempt, final_loss,
                 " (target reached)" if reached else "")
    _save_atomically(model, tokenizer, target)
    return target


def supervised_finetune(model, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
                        batch_size: int, seed: int, weight_decay: float = 0.0, target_loss: float = 0.0,
                        give_up: tuple[int, float] | None = None, progress: bool = False) -> tuple[float, int]:
    """Cross-entropy on response tokens through the fused log-prob kernel (no [tokens x vocab] logits).

    Returns (mean loss of the last steps, steps run). Schedule: linear warm-up over the first 100 steps (or
    tenth, if shorter), the full rate until half-way, then a cosine to zero. Weight decay applies to matrices,
    not to norms and embeddings. On the digits task the loss sits on a plateau until the model finds the digit
    alignment, after a seed-dependent number of steps; decay and the flat first half got seeds off it that a
    plain cosine left there (bench/NOTES.md, "Learning demo trials"). With `target_loss` > 0 the run stops once the mean
    loss of the last LOSS_WINDOW steps is below it, so RL starts from comparable competence on every seed.
    With `give_up` = (k, loss) the run also stops after k steps if that mean loss is still above `loss`.
    """
    gen = torch.Generator().manual_seed(seed)
    matrices = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embed" not in name]
    others = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in name)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=lr)
    warmup, flat = max(1, min(100, steps // 10)), steps // 2

    def rate(s: int) -> float:
        ramp = min(1.0, (s + 1) / warmup)
        return ramp if s < flat else ramp * 0.5 * (1 + math.cos(math.pi * (s - flat) / max(1, steps - flat)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    recent: list[float] = []
    bar = Progress(steps, "warm start", enabled=progress)
    done = 0
    for _ in range(steps):
        done += 1
        pick = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = pack_sequences([RolloutSequence(prompt_ids=examples[i][0], response_ids=examples[i][1],
                                                rollout_logprobs=[], temperature=1.0, advantage=0.0, seq_key=key)
                                for key, i in enumerate(pick)], temperature=1.0)
        hidden = last_hidden_state(model, batch.input_ids, batch.position_ids)[0, batch.label_index]
        loss = -linear_logprobs(hidden, lm_head_weight(model), batch.target_ids, 1.0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        recent = [*recent[-(LOSS_WINDOW - 1):], float(loss.detach())]
        mean_loss = sum(recent) / len(recent)
        bar.update(1, f"loss {mean_loss:.3f}")
        if target_loss > 0 and len(recent) == LOSS_WINDOW and mean_loss < target_loss:
            break
        if give_up is not None and done == give_up[0] and mean_loss > give_up[1]:
            break
    bar.close()
    model.eval()
    return (sum(recent) / len(recent) if recent else float("nan")), done


def _save_atomically(model, tokenizer, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same warm start first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
