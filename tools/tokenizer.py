"""Byte-level BPE tokenizers trained offline on the synthetic corpus, one per family.

A family fixes what real checkpoints of that lineage ship: the pre-tokenizer regex,
the special tokens (appended after the BPE vocabulary, as in Llama 3 and Qwen2), which
token ends a turn, whether encoding prepends a BOS, and the chat template.

NOTE: `len(tokenizer)` (BPE tokens + special tokens) is exactly the requested
vocab size, so every id a model with that vocab can emit decodes to something.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import corpus_lines

# The tokenizer of a vocab size does not depend on the model's seed.
_CORPUS_SEED = 0

# The split regexes of the real tokenizers (GPT-4 style; Llama 3 groups digits by three,
# Qwen2 splits every digit).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TokenizerFamily:
    """What a tokenizer of one model lineage looks like (specials, regex, template)."""

    name: str
    special_tokens: tuple[str, ...]  # appended in this order after the BPE vocab
    bos_token: str | None  # None: the family has no BOS (Qwen)
    end_of_text: str  # ends a document; first entry of generation_config eos_token_id
    end_of_turn: str  # ends a chat turn; the tokenizer's eos_token
    pad_token: str
    add_bos: bool  # whether encode(add_special_tokens=True) prepends bos_token
    split_regex: str
    nfc: bool  # NFC-normalise input (Qwen2 does)
    chat_template: str
    assistant_header: str  # what add_generation_prompt appends


FAMILIES: dict[str, TokenizerFamily] = {
    "llama3": TokenizerFamily(
        name="llama3",
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos_token="<|begin_of_text|>",
        end_of_text="<|end_of_text|>",
        end_of_turn="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        add_bos=True,
        split_regex=_LLAMA3_REGEX,
        nfc=False,
        chat_template=_LLAMA3_TEMPLATE,
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": TokenizerFamily(
        name="chatml",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos_token=None,
        end_of_text="<|endoftext|>",
        end_of_turn="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos=False,
        split_regex=_QWEN2_REGEX,
        nfc=True,
        chat_template=_CHATML_TEMPLATE,
        assistant_header="<|im_start|>assistant\n",
    ),
}


@functools.lru_cache(maxsize=8)
def _trained_backend_json(family_name: str, vocab_size: int) -> str:
    """Train the family's BPE to `vocab_size` tokens in total; return tokenizer.json text.

    Cached per process: a `tokenizers.Tokenizer` is mutable, its JSON text is not.
    """
    family = FAMILIES[family_name]
    num_bpe = vocab_size - len(family.special_tokens)
    tok = Tokenizer(models.BPE())
    if family.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A lexicon as large as the vocab leaves the trainer enough distinct merges.
    tok.train_from_iterator(corpus_lines(num_words=max(vocab_size, 1000), seed=_CORPUS_SEED), trainer)
    if tok.get_vocab_size() != num_bpe:
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {num_bpe}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.add_bos:
        bos, bos_id = family.bos_token, tok.token_to_id(family.bos_token)
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok.to_str()


def build_tokenizer(family_name: str, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Return a fresh transformers tokenizer of `family_name` with exactly `vocab_size` ids.

    The BPE training (a few seconds for a 150k vocab) is cached per process.
    """
    family = FAMILIES[family_name]
    backend = Tokenizer.from_str(_trained_backend_json(family_name, vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos_token,
        eos_token=family.end_of_turn,
        pad_token=family.pad_token,
        unk_token=None,
        chat_template=family.chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, wanted {vocab_size}")
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast, family_name: str) -> dict[str, int | None]:
    """The ids a model config needs: bos, end-of-text, end-of-turn and pad."""
    family = FAMILIES[family_name]
    ids = tokenizer.convert_tokens_to_ids
    return {
        "bos": ids(family.bos_token) if family.bos_token else None,
        "end_of_text": ids(family.end_of_text),
        "end_of_turn": ids(family.end_of_turn),
        "pad": ids(family.pad_token),
    }
