"""The served model's tokenizer, chat template and generation defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import ChatMessage

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p")

# How much each normalizer can shrink a text, in characters (None: no bound is known).
# NFC/NFKC compose at most a few code points into one (Hangul L+V+T -> 1 syllable).
_SHRINK = {"Prepend": 1.0, "NFD": 1.0, "NFKD": 1.0, "Lowercase": 1.0, "NFC": 3.0, "NFKC": 3.0}


@dataclass
class ModelTokenizer:
    """Wraps a Hugging Face tokenizer with what the frontend needs of it.

    NOTE: encoding goes straight to the ``tokenizers.Tokenizer`` underneath, which only
    borrows it immutably (transformers' ``encode`` may reconfigure truncation), so the
    frontend can encode on a helper thread while its loop decodes streams.
    """

    hf: object  # transformers PreTrainedTokenizerFast
    eos_token_ids: list[int]
    sampling_defaults: dict = field(default_factory=dict)
    max_chars_per_token: float | None = None  # no token covers more input characters than this

    @classmethod
    def load(cls, model_dir: str) -> "ModelTokenizer":
        from ..models.loader import load_tokenizer

        tok = load_tokenizer(model_dir)
        eos: list[int] = []
        defaults: dict = {}
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text())
            ids = gen.get("eos_token_id")
            eos = [ids] if isinstance(ids, int) else list(ids or [])
            # NOTE: like vLLM, the sampling fields the checkpoint sets become defaults;
            # ``do_sample`` is not read (requests choose greedy with temperature 0).
            defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if k in gen}
        if not eos and tok.eos_token_id is not None:
            eos = [tok.eos_token_id]
        return cls(tok, eos, defaults, chars_per_token_bound(tok.backend_tokenizer))

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` underneath (for incremental decoding)."""
        return self.hf.backend_tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # NOTE: encode_batch releases the GIL while it works (encode does not), so a long
        # text tokenized on a helper thread leaves the frontend's loop running
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def render_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
        """The conversation through the chat template, ready for the assistant's turn;
        ``tools`` (OpenAI function definitions) go to the template as its ``tools``."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template; send a prompt instead")
        return self.hf.apply_chat_template([template_message(m) for m in messages], tools=tools or None,
                                           tokenize=False, add_generation_prompt=True)

    def apply_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
        # NOTE: the template already wrote BOS and the like; do not add them twice.
        return self.encode(self.render_chat(messages, tools), add_special_tokens=False)

    def surely_longer_than(self, num_chars: int, max_tokens: int) -> bool:
        """True when a text of ``num_chars`` characters certainly has more than
        ``max_tokens`` tokens: decided without tokenizing it."""
        bound = self.max_chars_per_token
        return bound is not None and num_chars > max_tokens * bound

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_one(self, token_id: int) -> str:
        """One token's text on its own (for logprobs)."""
        return self.hf.decode([token_id], skip_special_tokens=False)


def template_message(m: ChatMessage) -> dict:
    """A message as Hugging Face chat templates read it: tool calls' arguments as objects."""
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type,
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template shows it as it came


def chars_per_token_bound(backend) -> float | None:
    """An upper bound on the input characters one token can stand for, or None.

    Every token covers a span of the normalized text, and no span has more characters
    than the token's string has UTF-8 bytes (byte-level BPE spells each byte with one
    character; SentencePiece spells a space with the 3-byte "▁"). A normalizer that
    shrinks text widens the bound by how much it can shrink it; one whose shrinking is
    unknown gives no bound.
    """
    vocab = backend.get_vocab(with_added_tokens=True)
    longest = max((len(t.encode("utf-8")) for t in vocab), default=1)
    spec = json.loads(backend.to_str()).get("normalizer")
    factor = _shrink_factor(spec)
    return None if factor is None else longest * factor


def _shrink_factor(spec: dict | None) -> float | None:
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        total = 1.0
        for part in spec.get("normalizers", []):
            f = _shrink_factor(part)
            if f is None:
                return None
            total *= f
        return total
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:
            return None  # a regex, or a deletion: it may shrink a text without limit
        return max(1.0, len(pattern) / len(content))
    return _SHRINK.get(kind)
