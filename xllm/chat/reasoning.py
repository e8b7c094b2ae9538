"""The reasoning part of a model's text, split off as ``reasoning_content`` (chosen with
``--reasoning-parser``).

- ``deepseek_r1``: the chat template opens ``<think>`` in the prompt, so the text starts
  inside the thinking (a leading ``<think>`` is dropped too): everything up to
  ``</think>`` is reasoning, the rest content; without ``</think>`` all is reasoning.
- ``qwen3``: reasoning only when the text starts with ``<think>``; without ``</think>``
  the unfinished thinking is reasoning.

``split(text, final)`` holds back a half-written tag while the text may still grow, and
each answer extends the previous one (``ReasoningStream`` streams by diffing).
"""

from __future__ import annotations

from .tool_parsers import _held

START, END = "<think>", "</think>"


class ReasoningParser:
    """(reasoning, content) out of a model's text."""

    def __init__(self, name: str, starts_inside: bool) -> None:
        self.name = name
        self.starts_inside = starts_inside

    def split(self, text: str, final: bool) -> tuple[str, str]:
        lead = text.lstrip()
        if lead.startswith(START):
            body = lead[len(START):]
        elif not final and START.startswith(lead):
            return "", ""  # maybe a tag on its way
        elif self.starts_inside:
            body = text
        else:
            return "", text
        k = body.find(END)
        if k < 0:
            return (body if final else body[:len(body) - _held(body, END)]), ""
        return body[:k], body[k + len(END):].lstrip()


PARSERS = {"deepseek_r1": ReasoningParser("deepseek_r1", True), "qwen3": ReasoningParser("qwen3", False)}


def reasoning_parser(name: str) -> ReasoningParser:
    """The parser called ``name``; ValueError naming the known ones."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}") from None


class ReasoningStream:
    """Streams (reasoning, content) pieces of a growing text by diffing ``split``."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = [0, 0]

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        self.text += piece
        parts = self.parser.split(self.text, final)
        out = []
        for i, part in enumerate(parts):
            out.append(part[self.sent[i]:])
            self.sent[i] = max(self.sent[i], len(part))
        return out[0], out[1]
