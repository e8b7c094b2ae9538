"""``tools`` and ``tool_choice`` of a chat request: what the chat template is given, what
the output is constrained to, and how the reply is read.

- ``none``: the template still shows the tools (as vLLM does by default), the reply is
  plain content.
- ``auto`` (the default with tools): the template shows the tools and the reply is read
  by the server's ``--tool-call-parser``; without one, a 400 says so (as vLLM does).
- ``required``: the output is constrained (structured output) to a JSON array of one or
  more ``{"name": <a tool>, "parameters": <its schema>}``; each item is a call.
- ``parallel_tool_calls: false``: at most one call (the schema's ``maxItems``, or the
  parser's first call).
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is
  constrained to that function's parameters schema; it is the call's arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgspec

from ..chat.tool_parsers import JsonArrayParser, NamedArguments, ParsedCall, ToolParser, tool_parser
from ..protocol import StructuredOutput
from .errors import ApiError
from .schemas import ChatRequest, ToolIn

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    tools: list[dict] = field(default_factory=list)  # given to the chat template
    parser: ToolParser | None = None  # reads tool calls out of the reply
    structured: StructuredOutput | None = None  # the constraint a forced choice sets


def tool_plan(req: ChatRequest, parser_name: str) -> ToolPlan:
    """The plan for ``req``; 400 naming ``tools`` or ``tool_choice`` when it cannot be served."""
    tools = list(req.tools or [])
    choice = req.tool_choice
    for i, t in enumerate(tools):
        if t.type != "function":
            raise ApiError(400, f"tool type {t.type!r} is not supported; use function", "invalid_value",
                           f"tools[{i}].type")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "invalid_value", "tool_choice")
        return ToolPlan()
    rendered = [msgspec.to_builtins(t) for t in tools]
    if choice == "none":
        return ToolPlan(rendered)
    if choice in (None, "auto"):
        if not parser_name:
            raise ApiError(400, 'tool_choice "auto" needs the server started with --tool-call-parser '
                                '(or send tool_choice "required" or a named function)', "invalid_value",
                           "tool_choice")
        parser = tool_parser(parser_name)
        return ToolPlan(rendered, parser if req.parallel_tool_calls else FirstCall(parser))
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": t.function.parameters or ANY_OBJECT},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan(rendered, JsonArrayParser(), StructuredOutput("json_schema", json.dumps(schema)))
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        chosen = _named(tools, name)
        schema = chosen.function.parameters or ANY_OBJECT
        return ToolPlan(rendered, NamedArguments(chosen.function.name),
                        StructuredOutput("json_schema", json.dumps(schema)))
    raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                        '"function": {"name": ...}}', "invalid_value", "tool_choice")


class FirstCall(ToolParser):
    """``parallel_tool_calls: false`` under ``auto``: only the reply's first call is a call."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser

    def split(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        content, calls = self.parser.split(text, final)
        return content, calls[:1]


def _named(tools: list[ToolIn], name) -> ToolIn:
    for t in tools:
        if t.function.name == name:
            return t
    raise ApiError(400, f"tool_choice names function {name!r}, which is not in tools "
                        f"({', '.join(t.function.name for t in tools)})", "invalid_value", "tool_choice")
