"""Request bodies of the OpenAI-compatible API, as msgspec Structs.

These are HTTP bodies, not wire messages (those live in ``xllm.protocol``). Decoding a
body against its Struct is the whole of input validation for types and ranges; the
error names the field. Unknown fields are ignored, as OpenAI clients send extras.
Ranges only keep values inside what the engine can carry; the engine checks the rest
(``SamplingParams.validate``, the context length) and its message comes back as a 400.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

Int32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # token ids, counts
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
N = Annotated[int, Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]


class StreamOptions(msgspec.Struct):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    """Fields shared by completions and chat: OpenAI's, vLLM's extensions, xllm's."""

    model: str
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    seed: Seed | None = None
    user: str | None = None
    # vLLM extensions
    top_k: Int32 | None = None  # -1 or 0: all tokens
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: list[Count] | None = None
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice (and stream chunk) carries its output token ids
    # structured output (xllm.http.structured): at most one of these asks for a constraint
    response_format: dict[str, Any] | None = None  # OpenAI's: text, json_object, json_schema
    guided_json: Any = None  # vLLM's: a JSON schema (an object or its JSON text)
    guided_regex: str | None = None
    guided_grammar: str | None = None  # a Lark grammar
    guided_choice: list[str] | None = None  # the output is one of these strings
    structured_outputs: dict[str, Any] | None = None  # vLLM's newer {json|regex|grammar|choice|json_object}
    # xllm extensions
    priority: Int32 = 0  # lower runs first under the priority policy
    offline: bool = False  # only uses spare capacity


class CompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/completions``: a prompt as text, token ids, or a list of either."""

    prompt: str | list[str | Count | list[Count]]
    max_tokens: Count | None = 16
    logprobs: TopLogprobs | None = None  # k: the sampled token's and the k most likely
    echo: bool = False  # put the prompt in front of the output text
    best_of: N | None = None  # accepted when equal to n


class ContentPart(msgspec.Struct):
    """One part of a message's content; only ``text`` parts are served."""

    type: str
    text: str | None = None


class CallFunctionIn(msgspec.Struct):
    """The function of a tool call an assistant turn made; arguments as JSON text."""

    name: str
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct):
    """A tool call of an assistant turn, as clients send the conversation back."""

    id: str
    function: CallFunctionIn
    type: str = "function"


class ChatMessageIn(msgspec.Struct):
    """One chat turn as clients send it."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class FunctionIn(msgspec.Struct):
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(msgspec.Struct):
    """One entry of ``tools`` (only ``type: "function"`` exists)."""

    type: str
    function: FunctionIn


class ChatRequest(_Sampling, kw_only=True):
    """``POST /v1/chat/completions``: a conversation rendered by the model's chat template."""

    messages: list[ChatMessageIn]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[ToolIn] | None = None  # functions the model may call (xllm.http.tools)
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required, or {"type": "function", ...}
    parallel_tool_calls: bool = True  # false: at most one call (xllm/http/tools.py)


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /tokenize``: a prompt or a conversation -> token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    tools: list[ToolIn] | None = None  # rendered by the chat template with the messages
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /detokenize``: token ids -> text."""

    model: str | None = None
    tokens: list[Count]


BODIES = (CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest)
"""Every request body, for the OpenAPI document."""
