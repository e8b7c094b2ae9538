"""A forgiving scanner over JSON text that may still be arriving.

Parsers of model output need to know, before a JSON object is complete, where its
top-level values start and whether each has ended, to stream a tool call's name as soon
as it is whole and its arguments as they grow. ``scan_value`` walks one value; it never
needs the rest of the text to be valid.
"""

from __future__ import annotations

import json

_WS = " \t\r\n"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def scan_value(text: str, i: int) -> int | None:
    """The end (exclusive) of the JSON value starting at ``text[i]``, or None when the text
    stops before the value does."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _scan_string(text, i)
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < len(text):
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number, true, false or null: ends at a delimiter
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def _scan_string(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def object_fields(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the object starting at ``text[i]`` (``{``): key -> (start,
    end or None while unfinished) of its raw value, and the object's end (None while open).
    Stops at the first field whose value is unfinished."""
    fields: dict[str, tuple[int, int | None]] = {}
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            return fields, j + 1
        if text[j] == ",":
            j = skip_ws(text, j + 1)
            continue
        key_end = _scan_string(text, j) if text[j] == '"' else None
        if key_end is None:
            return fields, None
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text) or text[j] != ":":
            return fields, None
        start = skip_ws(text, j + 1)
        if start >= len(text):
            return fields, None
        end = scan_value(text, start)
        fields[key] = (start, end)
        if end is None:
            return fields, None
        j = skip_ws(text, end)
    return fields, None
