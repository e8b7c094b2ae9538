"""The request fields that ask for structured output, as one ``StructuredOutput``.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's
extensions: ``guided_json``, ``guided_regex``, ``guided_grammar`` (a Lark grammar),
``guided_choice``, and the newer ``structured_outputs: {json | regex | grammar | choice |
json_object}``. At most one may ask for a constraint. Only the shape is checked here;
whether the grammar library can enforce it is the frontend's check, whose 400 names what
it refuses.
"""

from __future__ import annotations

import json
from typing import Any

from ..protocol import StructuredOutput
from .errors import ApiError

ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object, as OpenAI promises


def structured_output(req) -> StructuredOutput | None:
    """The constraint the body of ``req`` asks for (a ``_Sampling``), or None."""
    asked = [(name, so) for name, so in _candidates(req) if so is not None]
    if len(asked) > 1:
        raise ApiError(400, f"give one structured output constraint, got {', '.join(n for n, _ in asked)}",
                       "invalid_value", asked[1][0])
    return asked[0][1] if asked else None


def _candidates(req):
    yield "response_format", _response_format(req.response_format)
    yield "guided_json", None if req.guided_json is None else _schema(req.guided_json, "guided_json")
    yield "guided_regex", _text(req.guided_regex, "regex", "guided_regex")
    yield "guided_grammar", _text(req.guided_grammar, "lark", "guided_grammar")
    yield "guided_choice", None if req.guided_choice is None else _choice(req.guided_choice, "guided_choice")
    so = req.structured_outputs
    if so:
        given = [k for k in ("json", "regex", "grammar", "choice", "json_object") if so.get(k) not in (None, False)]
        if len(given) > 1:
            raise ApiError(400, f"structured_outputs takes one of json, regex, grammar, choice, json_object; "
                                f"got {', '.join(given)}", "invalid_value", "structured_outputs")
        for key in given:
            param = f"structured_outputs.{key}"
            yield param, {"json": lambda v: _schema(v, param), "regex": lambda v: _text(v, "regex", param),
                          "grammar": lambda v: _text(v, "lark", param), "choice": lambda v: _choice(v, param),
                          "json_object": lambda v: StructuredOutput("json_schema", ANY_OBJECT)}[key](so[key])


def _response_format(fmt: dict | None) -> StructuredOutput | None:
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_schema", ANY_OBJECT)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ApiError(400, 'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                           "invalid_value", "response_format.json_schema")
        return _schema(spec["schema"], "response_format.json_schema.schema")
    raise ApiError(400, f"unknown response_format type {kind!r}; use text, json_object or json_schema",
                   "invalid_value", "response_format.type")


def _schema(schema: Any, param: str) -> StructuredOutput:
    if isinstance(schema, str):  # JSON text, as vLLM's guided_json also takes
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ApiError(400, f"{param} is not valid JSON", "invalid_value", param) from None
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"{param} must be a JSON schema (an object)", "invalid_type", param)
    return StructuredOutput("json_schema", json.dumps(schema))


def _text(value: Any, kind: str, param: str) -> StructuredOutput | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param} must be a non-empty string", "invalid_type", param)
    return StructuredOutput(kind, value)


def _choice(options: Any, param: str) -> StructuredOutput:
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise ApiError(400, f"{param} must be a non-empty list of non-empty strings", "invalid_type", param)
    return StructuredOutput("lark", "start: " + " | ".join(json.dumps(o) for o in options))
