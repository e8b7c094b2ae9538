"""Tool calls parsed out of a model's text, by format (chosen with ``--tool-call-parser``).

Every parser has one verb, ``split(text, final)``: the content a client may be shown
and the tool calls found so far. With ``final=False`` the text may still grow, so
``split`` holds back what could still become part of a call (a half-written
``<tool_call>`` tag), reports a call once its name is whole, and its arguments as the
raw JSON text written so far. Each answer extends the previous one, which is what lets
``ToolCallStream`` stream by diffing. With ``final=True`` a call that never became
valid JSON is given back as content: no text is lost.

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number, with text around them.
- ``llama3_json`` (Llama 3.x): the whole reply is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;``.
- ``json_array`` (internal: ``tool_choice: "required"``): ``[{"name": ..., "parameters": ...}, ...]``.
- ``NamedArguments`` (internal: a named ``tool_choice``): the whole reply is the arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .json_scan import object_fields, skip_ws


@dataclass
class ParsedCall:
    """One tool call as far as the text goes."""

    name: str
    arguments: str  # raw JSON text of the arguments object (a prefix of it while unfinished)
    complete: bool = True


def _held(tail: str, tag: str) -> int:
    """How many characters at the end of ``tail`` could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(tail)), 0, -1):
        if tag.startswith(tail[-n:]):
            return n
    return 0


def _valid(call: ParsedCall) -> bool:
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def _call(text: str, start: int) -> tuple[ParsedCall | None, int | None]:
    """The call in the object at ``text[start]``: (the call once its name is whole, or None;
    the object's end, or None while it is open)."""
    fields, end = object_fields(text, start)
    name = fields.get("name")
    if name is None or name[1] is None:
        return None, end
    try:
        name_value = json.loads(text[name[0]:name[1]])
    except ValueError:
        return None, end
    args = fields.get("arguments") or fields.get("parameters")
    if args is None:
        raw, done = ("{}", True) if end is not None else ("", False)
    else:
        raw, done = text[args[0]:args[1] if args[1] is not None else len(text)], args[1] is not None
    return ParsedCall(str(name_value), raw, done and end is not None), end


class ToolParser:
    """Content and tool calls out of a model's text (see the module docstring)."""

    name = ""

    def split(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """The finished text's content and its calls."""
        return self.split(text, True)


class HermesParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        content, calls, i = [], [], 0
        while True:
            k = text.find(self.OPEN, i)
            if k < 0:
                tail = text[i:]
                if not final:
                    tail = tail[:len(tail) - _held(tail, self.OPEN)]
                    if calls and not tail.strip():
                        tail = ""  # whitespace after a call shows only if text follows it
                if not calls or tail.strip():
                    content.append(tail)
                break
            piece = text[i:k]
            if not calls or piece.strip():
                content.append(piece)
            j = skip_ws(text, k + len(self.OPEN))
            if j >= len(text):
                if final:
                    content.append(text[k:])
                break
            if text[j] != "{":  # not a call after all: the tag is text
                content.append(self.OPEN)
                i = k + len(self.OPEN)
                continue
            call, end = _call(text, j)
            if end is None:
                if final:
                    content.append(text[k:])
                elif call is not None:
                    calls.append(call)
                break
            if call is None or not _valid(call):
                content.append(text[k:end])
                i = end
                continue
            calls.append(call)
            close = text.find(self.CLOSE, end)
            if close < 0:
                break  # the closing tag is still to come (or, in the final text, missing)
            i = close + len(self.CLOSE)
        return "".join(content), calls


class _JsonObjects(ToolParser):
    """Calls as JSON objects one after another (``open``, ``sep``, ``close`` around them)."""

    prefix = ""  # an optional marker before the first object
    open = ""
    sep = ";"
    close = ""

    def split(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        j = skip_ws(text, 0)
        if self.prefix and text.startswith(self.prefix, j):
            j = skip_ws(text, j + len(self.prefix))
        elif self.prefix and not final and text[j:] and self.prefix.startswith(text[j:]):
            return "", []
        if self.open:
            if text.startswith(self.open, j):
                j = skip_ws(text, j + len(self.open))
            elif not final and j >= len(text):
                return "", []
        if j >= len(text):
            return ("" if not final else text), []
        if text[j] != "{":
            return text, []
        calls: list[ParsedCall] = []
        while j < len(text):
            call, end = _call(text, j)
            if end is None:
                if final:
                    return text, []
                if call is not None:
                    calls.append(call)
                return "", calls
            if call is None or not _valid(call):
                return (text, []) if final else ("", calls)
            calls.append(call)
            j = skip_ws(text, end)
            if j < len(text) and text[j] == self.sep:
                j = skip_ws(text, j + 1)
            elif j < len(text) and self.close and text[j] == self.close:
                break
            elif j < len(text):
                return (text if final else "", calls if not final else [])
        return "", calls


class Llama3JsonParser(_JsonObjects):
    name = "llama3_json"
    prefix = "<|python_tag|>"


class JsonArrayParser(_JsonObjects):
    name = "json_array"
    open, sep, close = "[", ",", "]"


class NamedArguments(ToolParser):
    """The reply is one call's arguments (a named ``tool_choice``, enforced by a schema)."""

    def __init__(self, function: str) -> None:
        self.function = function

    def split(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        return "", [ParsedCall(self.function, text.strip() if final else text.lstrip(), final)]


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def tool_parser(name: str) -> ToolParser:
    """The parser called ``name``; ValueError naming the known ones."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(PARSERS)}") from None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Streams a parser's view of a growing text as OpenAI deltas: ``content`` pieces and
    ``tool_calls`` entries (``index``, ``id``, ``type``, ``function.name`` first, then
    ``function.arguments`` fragments)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_content = 0
        self.sent_args: list[int] = []  # characters of each call's arguments sent so far
        self.ids: list[str] = []

    def feed(self, piece: str, final: bool = False) -> dict:
        """The delta fields for ``piece`` of new text (``final``: the text is complete)."""
        self.text += piece
        content, calls = self.parser.split(self.text, final)
        delta: dict = {}
        if len(content) > self.sent_content:
            delta["content"] = content[self.sent_content:]
            self.sent_content = len(content)
        entries = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(call_id())
                self.sent_args.append(0)
                entries.append({"index": index, "id": self.ids[index], "type": "function",
                                "function": {"name": call.name, "arguments": ""}})
            new = call.arguments[self.sent_args[index]:]
            if new:
                self.sent_args[index] = len(call.arguments)
                if entries and entries[-1]["index"] == index:
                    entries[-1]["function"]["arguments"] += new
                else:
                    entries.append({"index": index, "function": {"arguments": new}})
        if entries:
            delta["tool_calls"] = entries
        return delta

    @property
    def num_calls(self) -> int:
        return len(self.ids)


def message_fields(parser: ToolParser, text: str) -> dict:
    """The non-streaming message's ``content`` and ``tool_calls`` for a finished text."""
    content, calls = parser.parse(text)
    out: dict = {"content": content if content or not calls else None}
    if calls:
        out["tool_calls"] = [{"id": call_id(), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return out
