"""Every check a client's request passes before it reaches the scheduler, in one place.

The frontend is the door that knows the tokenizer, the vocabulary and the context
length, so the HTTP shim and the SDK leave these checks to it. Errors are
``InvalidParam`` (naming the field) or ``ValueError``.

NOTE: a request is bounded by size *before* anything is spent on it: a text prompt
that surely has more tokens than the context (``ModelTokenizer.surely_longer_than``) is
refused without tokenizing it, and a token-id prompt by its length before its ids
are looked at.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..protocol import ChatMessage, GenerateRequest, InvalidParam, SamplingParams
from ..structured import GrammarCompiler
from .tokenizer import ModelTokenizer


class RequestChecker:
    """Validates and tokenizes requests for one model. Thread-safe (its one state, the
    grammar compiler, is built on the first structured request and caches by itself)."""

    def __init__(self, tok: ModelTokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tok = tok
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._grammars: GrammarCompiler | None = None

    # -- size, before any work ----------------------------------------------------------------
    @staticmethod
    def input_chars(req: GenerateRequest) -> int:
        """The characters (or token ids) the request's prompt brings."""
        if req.prompt is not None:
            return len(req.prompt)
        if req.messages is not None:
            return message_chars(req.messages) + (len(msgspec.json.encode(req.tools)) if req.tools else 0)
        return len(req.prompt_token_ids or ())

    def before_tokenizing(self, req: GenerateRequest) -> None:
        """The checks that need no tokenizer: one input, its size, the sampling ranges."""
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        req.sampling.validate()
        if req.messages is not None and not req.messages:
            raise InvalidParam("messages", "messages is empty")
        if req.prompt_token_ids is not None:
            self._check_length(len(req.prompt_token_ids))
        elif self.tok.surely_longer_than(self.input_chars(req), self.max_model_len - 1):
            raise InvalidParam("prompt" if req.prompt is not None else "messages",
                               f"the prompt is longer than the model's context of {self.max_model_len} "
                               f"tokens ({self.input_chars(req)} characters)")

    # -- tokens -----------------------------------------------------------------------------------
    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids, checked against the vocabulary and the context."""
        if req.prompt is not None:
            ids = self.tok.encode(req.prompt, req.add_special_tokens)
        elif req.messages is not None:
            ids = self.tok.apply_chat(req.messages, req.tools)
        else:
            ids = self.token_list(req.prompt_token_ids, "prompt_token_ids")
        if not ids:
            raise InvalidParam("prompt", "the prompt is empty")
        self._check_length(len(ids))
        return ids

    def _check_length(self, n: int) -> None:
        if n >= self.max_model_len:
            raise InvalidParam("prompt", f"the prompt has {n} tokens; the model's context is "
                                         f"{self.max_model_len} and at least one must be left for the output")

    def token_list(self, tokens: Any, param: str = "tokens") -> list[int]:
        """``tokens`` as a list of ids inside the vocabulary."""
        if not isinstance(tokens, list):
            raise InvalidParam(param, f"{param} must be a list of token ids")
        bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParam(param, f"token id {bad[0]!r} is outside the vocabulary "
                                      f"(0..{self.vocab_size - 1})")
        return tokens

    def sampling(self, req: GenerateRequest, ids: list[int]) -> SamplingParams:
        """The request's sampling parameters, checked and with every default resolved."""
        sp = req.sampling
        for name, tokens in (("logit_bias", list(sp.logit_bias)), ("stop_token_ids", sp.stop_token_ids)):
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParam(name, f"token id {bad[0]} in {name} is outside the vocabulary")
        if sp.max_tokens is not None and len(ids) + sp.max_tokens > self.max_model_len:
            raise InvalidParam("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) "
                                             f"exceeds the model's context of {self.max_model_len}")
        if sp.structured is not None:
            self.grammar(sp)
        return sp.resolve(self.tok.sampling_defaults, self.max_model_len - len(ids))

    def grammar(self, sp: SamplingParams) -> None:
        """Check the request's structured output with the grammar library the workers use:
        ``InvalidParam("structured", ...)`` naming what it refuses (a schema keyword it
        cannot enforce, a regex or grammar error). Workers never see a refused one."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tok.hf, self.vocab_size)
        self._grammars.check(sp.structured)

    # -- the tokenize control call ----------------------------------------------------------------
    def tokenize_call(self, args: dict) -> list[int]:
        """``tokenize``'s args (``prompt`` or ``messages``) as token ids."""
        if "messages" in args:
            try:
                messages = msgspec.convert(args["messages"], list[ChatMessage])
            except msgspec.ValidationError as exc:
                raise InvalidParam("messages", f"messages must be a list of {{role, content}}: {exc}") from None
            tools = args.get("tools") or []
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise InvalidParam("tools", "tools must be a list of function definitions")
            size = message_chars(messages) + len(msgspec.json.encode(tools))
        else:
            prompt = args.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidParam("prompt", "prompt must be a string")
            size = len(prompt)
        # NOTE: counting a text's tokens is allowed past the context, up to the size bound
        if self.tok.surely_longer_than(size, 4 * self.max_model_len):
            raise InvalidParam("prompt", f"the text is far longer than the model's context of "
                                         f"{self.max_model_len} tokens ({size} characters)")
        if "messages" in args:
            return self.tok.apply_chat(messages, tools)
        return self.tok.encode(prompt, bool(args.get("add_special_tokens", True)))


def message_chars(messages: list[ChatMessage]) -> int:
    """The characters a conversation brings (what bounds its token count)."""
    return sum(len(m.content) + len(m.role) + sum(len(c.function.name) + len(c.function.arguments)
                                                  for c in m.tool_calls) for m in messages)
