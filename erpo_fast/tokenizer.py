"""Offline character-level tokenizer for the built-in tiny model: one token per character, no download.

Built with the `tokenizers` library and wrapped as a `transformers` fast tokenizer, so it saves with
`save_pretrained` and loads back with `AutoTokenizer.from_pretrained(local_dir)` like any hub tokenizer.

Ids are fixed by construction: the special tokens first (`<pad>`=0, `<unk>`=1, `<eos>`=2, then the role
markers), then the alphabet in the order given. Characters outside the alphabet encode to `<unk>`.

The chat template is deliberately compact, because every prompt token costs rollout time on a CPU::

    <user>47+38=<assistant>          # apply_chat_template(..., add_generation_prompt=True)
    <user>47+38=<assistant>85<eos>   # a finished turn (what the warm start trains on)
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<eos>"
SYSTEM_TOKEN = "<system>"
USER_TOKEN = "<user>"
ASSISTANT_TOKEN = "<assistant>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

# Digits, the operators and punctuation of the arithmetic task, space, newline and lowercase letters (so
# that short worded prompts such as "what is 3+4?" still tokenize). 52 characters + 6 specials = 58 ids.
DEFAULT_ALPHABET = string.digits + "+-*/%()=#.,:;?" + " \n" + string.ascii_lowercase

MAX_VOCAB_SIZE = 64

# Roles map to one marker token each; an assistant turn ends with <eos>, which is what generation stops on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}" + USER_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + EOS_TOKEN +
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT_TOKEN + "{%- endif -%}"
)


def build_char_tokenizer(alphabet: Iterable[str] | None = None, model_max_length: int = 1024
                         ) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over `alphabet` (default: `DEFAULT_ALPHABET`).

    Padding is on the left, since the tokenizer's main use is batching prompts for generation.
    """
    chars = list(DEFAULT_ALPHABET if alphabet is None else alphabet)
    bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
    if bad:
        raise ValueError(f"alphabet must hold single characters, got {bad[:3]!r}")
    if len(set(chars)) != len(chars):
        dupes = sorted({c for c in chars if chars.count(c) > 1})
        raise ValueError(f"alphabet has repeated characters: {dupes!r}")
    if len(chars) + len(SPECIAL_TOKENS) > MAX_VOCAB_SIZE:
        raise ValueError(f"alphabet of {len(chars)} characters plus {len(SPECIAL_TOKENS)} special tokens exceeds "
                         f"the {MAX_VOCAB_SIZE}-token limit of the char tokenizer")

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # One piece per code point ([\s\S] also matches newline, which '.' would not).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without inserted spaces
    # Registered as special tokens so that "<eos>" in text is one id, never split into characters.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )
