"""Grammars of structured output, compiled with llguidance for one tokenizer.

A ``StructuredOutput`` (``xllm.protocol``) becomes an llguidance grammar here, in one
place, for both of its users: the frontend, which checks every request's grammar once at
the door (``GrammarCompiler.check``: an ``InvalidParam`` naming what the library refuses,
e.g. ``Unimplemented keys: ["not"]``), and the worker, which masks logits with matchers
of it (``GrammarCompiler.matcher``, ``xllm.worker.grammar``).

Why llguidance (``bench/RESULTS.md``, "Grammar mask cost"): xgrammar fills masks faster
(0.82 against 1.33 ms per step of 32 rows) but accepts schema keywords it does not enforce
(``not``, ``if``/``then``, ``uniqueItems``...) and has no Lark front end; llguidance
refuses what it cannot enforce, by name, so an accepted request's output always matches.

JSON is generated compact (no whitespace between tokens, ``,`` and ``:`` separators): the
model cannot spend its tokens on spaces, and a bounded schema gives a bounded output.
"""

from __future__ import annotations

import functools
import json

from .protocol import STRUCTURED_KINDS as KINDS
from .protocol import InvalidParam, StructuredOutput

CACHE_SIZE = 64  # compiled grammars kept per process (LRU)
_JSON_OPTIONS = {"whitespace_flexible": False}
_WHAT = {"json": "JSON", "json_schema": "JSON schema", "regex": "regular expression", "lark": "Lark grammar"}


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar of ``so``; ``InvalidParam`` when its spec is not even text of
    the right kind (a schema that is not a JSON object). Library checks come later."""
    from llguidance import LLMatcher

    if so.kind == "json":  # any JSON value
        return LLMatcher.grammar_from_json_schema("{}", defaults=_JSON_OPTIONS)
    if so.kind == "json_schema":
        try:
            schema = json.loads(so.spec)
        except ValueError as exc:
            raise InvalidParam("structured", f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidParam("structured", "the JSON schema must be a JSON object")
        return LLMatcher.grammar_from_json_schema(so.spec, defaults=_JSON_OPTIONS)
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "lark":
        return LLMatcher.grammar_from_lark(so.spec)
    raise InvalidParam("structured", f"unknown structured output kind {so.kind!r}; use one of {list(KINDS)}")


class GrammarCompiler:
    """Compiles ``StructuredOutput``s for one tokenizer, caching the last ``CACHE_SIZE``.

    Verbs: ``check`` (raise ``InvalidParam`` naming the problem), ``matcher`` (a fresh
    matcher at the grammar's start). Building it preprocesses the vocabulary (about 0.2 s
    for 32k tokens), so owners build it on the first structured request, not at start.
    """

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        """``vocab_size``: the model's logits width (may exceed the tokenizer's length)."""
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self._compiled = functools.lru_cache(maxsize=CACHE_SIZE)(self._compile)

    def check(self, so: StructuredOutput) -> None:
        """Raise ``InvalidParam`` when the library cannot enforce ``so``, naming why."""
        self._compiled(so)

    def matcher(self, so: StructuredOutput):
        """A new ``llguidance.LLMatcher`` for ``so`` at its start (``check`` it first)."""
        return self._compiled(so).deep_copy()

    def _compile(self, so: StructuredOutput):
        from llguidance import LLMatcher

        template = LLMatcher(self.tokenizer, grammar_text(so), log_level=0)
        if template.is_error():
            raise InvalidParam("structured", f"unsupported or invalid {_WHAT[so.kind]}: "
                                             f"{template.get_error().strip()}")
        return template
