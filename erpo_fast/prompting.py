"""Prompt text <-> token ids, shared by training, evaluation and the warm start so all three agree."""

from __future__ import annotations

from collections.abc import Sequence

from erpo_fast.errors import DataError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, ready for generation (chat template with the generation prompt when asked for)."""
    if chat_template and has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat_template: bool = True,
                   max_length: int | None = None, origins: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each prompt; one longer than ``max_length`` is a DataError naming where it comes from
    (``origins[i]``, e.g. "train.jsonl: line 17")."""
    out = [encode_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    if max_length is not None:
        for i, (text, ids) in enumerate(zip(prompts, out)):
            if len(ids) > max_length:
                where = f"{origins[i]}: " if origins is not None and origins[i] else ""
                raise DataError(f"{where}prompt of {len(ids)} tokens exceeds data.max_prompt_length={max_length}: "
                                f"{text[:60]!r}...")
    return out


def encode_completion(tokenizer, prompt: str, response: str, *, chat_template: bool = True
                      ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending with EOS): one supervised example for the warm start."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template=chat_template)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses could never stop")
    return prompt_ids, response_ids + [tokenizer.eos_token_id]


def stop_token_ids(tokenizer, model_eos) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and each id the model's generation config lists.

    They differ on chat models (Llama-3-Instruct ends a turn with ``<|eot_id|>``, listed only in its
    generation config), and HF ``generate`` stops on every listed id; stopping on one would sample every
    response to max_new_tokens and score text the model never meant to write.
    """
    ids = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.insert(0, tokenizer.eos_token_id)
    return list(dict.fromkeys(int(t) for t in ids))


def decode_response(tokenizer, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
