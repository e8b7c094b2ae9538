"""The served model's tokenizer, chat template and generation defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import ChatMessage

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p")


@dataclass
class ModelTokenizer:
    """Wraps a Hugging Face tokenizer with what the frontend needs of it."""

    hf: object  # transformers PreTrainedTokenizerFast
    eos_token_ids: list[int]
    sampling_defaults: dict = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: str) -> "ModelTokenizer":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
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
        return cls(tok, eos, defaults)

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` underneath (for incremental decoding)."""
        return self.hf.backend_tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat(self, messages: list[ChatMessage]) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template; send a prompt instead")
        text = self.hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False, add_generation_prompt=True)
        # NOTE: the template already wrote BOS and the like; do not add them twice.
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_one(self, token_id: int) -> str:
        """One token's text on its own (for logprobs)."""
        return self.hf.decode([token_id], skip_special_tokens=False)
