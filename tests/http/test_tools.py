"""Tool calling and reasoning content through the official ``openai`` client.

The model is tiny-qwen2 (random weights) with a chat template that shows tools and feeds
tool results back the way Qwen 2.5's does. A random model does not decide to call a tool,
so the calls are made to happen by constraint: ``tool_choice`` ``required`` or a named
function (enforced with a JSON schema), or, for the parsers, a ``guided_regex`` that forces
the model text into the parser's format. What is checked is what a client depends on: the
reply parsed into ``tool_calls`` whose arguments validate, the same calls when streamed,
the result sent back through the template, and ``<think>`` split into ``reasoning_content``.
"""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest

from tests.http.shim import serve_http

# ChatML with tools: the function signatures in the system turn, calls as <tool_call> JSON,
# results as <tool_response> inside a user turn (the layout Qwen 2.5 and Hermes models use).
TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nFunction signatures, one per line, inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, reply with <tool_call>{\"name\": ..., \"arguments\": {...}}"
    "</tool_call>.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": '"
    " + (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLE = {"temperature": 1.0, "max_tokens": 400}


@pytest.fixture(scope="module")
def model(make_tiny, tmp_path_factory):
    """tiny-qwen2 with the tool-aware chat template."""
    path = tmp_path_factory.mktemp("tool-model") / "tiny-qwen2-tools"
    shutil.copytree(make_tiny("tiny-qwen2"), path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def shim(model, tmp_path_factory):
    with serve_http(model, tmp_path_factory.mktemp("http-tools"), "--tool-call-parser", "hermes",
                    "--reasoning-parser", "qwen3") as s:
        yield s


@pytest.fixture(scope="module")
def oai(shim):
    client = shim.openai(timeout=120)
    yield client
    client.close()


def _check_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def _streamed(oai, shim, **kwargs) -> tuple[str, list[dict], str, str]:
    """(content, calls as {"id", "name", "arguments"}, finish_reason, reasoning) of a streamed reply."""
    content, reasoning, calls, reason = [], [], {}, None
    for chunk in oai.chat.completions.create(model=shim.model, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            reason = choice.finish_reason or reason
    return "".join(content), [calls[i] for i in sorted(calls)], reason, "".join(reasoning)


def test_named_tool_choice_gives_arguments_that_validate(oai, shim):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        reply = oai.chat.completions.create(model=shim.model, messages=ASK, tools=TOOLS,
                                            tool_choice=choice, seed=seed, **SAMPLE)
        msg = reply.choices[0].message
        assert reply.choices[0].finish_reason in ("stop", "tool_calls")
        assert not msg.content
        assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
        _check_call("get_weather", msg.tool_calls[0].function.arguments)
        assert msg.tool_calls[0].id and msg.tool_calls[0].type == "function"

        content, calls, reason, _ = _streamed(oai, shim, messages=ASK, tools=TOOLS, tool_choice=choice,
                                              seed=seed, **SAMPLE)
        assert not content and len(calls) == 1 and calls[0]["id"]
        # same seed, same tokens: the streamed call is the non-streamed one
        assert calls[0]["name"] == "get_weather"
        assert json.loads(calls[0]["arguments"]) == json.loads(msg.tool_calls[0].function.arguments)


def test_required_tool_choice_calls_listed_tools(oai, shim):
    for seed in range(3):
        reply = oai.chat.completions.create(model=shim.model, messages=ASK, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False,
                                            seed=seed, **SAMPLE)
        msg = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert len(msg.tool_calls) == 1
        _check_call(msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)

        _, calls, reason, _ = _streamed(oai, shim, messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, seed=seed, **SAMPLE)
        assert reason == "tool_calls" and len(calls) == 1
        _check_call(calls[0]["name"], calls[0]["arguments"])


def test_tool_round_trip_feeds_the_result_back_through_the_template(oai, shim):
    first = oai.chat.completions.create(model=shim.model, messages=ASK, tools=TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        seed=7, **SAMPLE)
    call = first.choices[0].message.tool_calls[0]
    args = _check_call(call.function.name, call.function.arguments)
    result = json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"]})
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    second = oai.chat.completions.create(model=shim.model, messages=history, tools=TOOLS,
                                         tool_choice="none", max_tokens=8, seed=7)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens

    # the prompt the model saw holds the call it made and the tool's answer
    tok = shim.post("/tokenize", {"model": shim.model, "messages": history, "tools": TOOLS})
    assert tok.status == 200, tok.body
    prompt = shim.post("/detokenize", {"model": shim.model, "tokens": tok.json()["tokens"]}).json()["prompt"]
    assert f"<tool_response>\n{result}\n</tool_response>" in prompt
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert json.loads(re.search(r"<tool_call>\n(.*)\n</tool_call>", prompt).group(1))["arguments"] == args


def test_hermes_parser_reads_calls_out_of_model_text(oai, shim):
    # the model is made to write what a Hermes/Qwen model writes when it calls tools
    text = (r'I will look\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", '
            r'"unit": "celsius"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": '
            r'\{"zone": "[A-Z]{3}"\}\}\n</tool_call>')
    kwargs = dict(messages=ASK, tools=TOOLS, tool_choice="auto", extra_body={"guided_regex": text}, **SAMPLE)
    for seed in range(2):
        reply = oai.chat.completions.create(model=shim.model, seed=seed, **kwargs)
        msg = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert msg.content.strip() == "I will look."
        assert [c.function.name for c in msg.tool_calls] == ["get_weather", "get_time"]
        for c in msg.tool_calls:
            _check_call(c.function.name, c.function.arguments)
        assert len({c.id for c in msg.tool_calls}) == 2

        content, calls, reason, _ = _streamed(oai, shim, seed=seed, **kwargs)
        assert reason == "tool_calls" and content.strip() == "I will look."
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]

        # parallel_tool_calls false: only the first call is a call
        one = oai.chat.completions.create(model=shim.model, seed=seed, parallel_tool_calls=False, **kwargs)
        assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_text_without_a_call_stays_content(oai, shim):
    reply = oai.chat.completions.create(model=shim.model, messages=ASK, tools=TOOLS, seed=1,
                                        extra_body={"guided_regex": "[a-z]{3,9}"}, **SAMPLE)
    msg = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert re.fullmatch("[a-z]{3,9}", msg.content) and not msg.tool_calls


def test_reasoning_is_split_from_the_answer(oai, shim):
    body = dict(messages=ASK, extra_body={"guided_regex": "<think>[a-z ]{5,40}</think>\n\n[a-z]{1,20}"}, **SAMPLE)
    for seed in range(2):
        reply = oai.chat.completions.create(model=shim.model, seed=seed, **body)
        msg = reply.choices[0].message
        thought = msg.model_extra["reasoning_content"]
        assert re.fullmatch("[a-z ]{5,40}", thought)
        assert re.fullmatch("[a-z]{1,20}", msg.content.strip())

        content, _, reason, reasoning = _streamed(oai, shim, seed=seed, **body)
        assert reason == "stop"
        assert (reasoning, content) == (thought, msg.content)
