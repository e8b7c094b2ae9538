"""Bad requests get a 4xx with an OpenAI-style error body, and the engine keeps serving.

The deployment has a 64-token context so "longer than the context" is cheap and the
fuzzed requests that happen to be valid finish quickly.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.shim import serve_http

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-bad")
    with serve_http(make_tiny("tiny-llama"), tmp, "--max-model-len", "64") as s:
        yield s


def assert_error(reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert reply.status == status, (reply.status, reply.body)
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


DROP = object()  # a field to leave out of the body
LONG_TEXT = "word " * 200  # more tokens than the 64-token context

# name: (path, fields changed in a valid body, status, error param, error code)
CASES = {
    "wrong type of prompt": (COMPLETIONS, {"prompt": 5}, 400, "prompt", None),
    "wrong type of max_tokens": (COMPLETIONS, {"max_tokens": "ten"}, 400, "max_tokens", None),
    "wrong type of temperature": (CHAT, {"temperature": "hot"}, 400, "temperature", None),
    "wrong type of a message": (CHAT, {"messages": ["hi"]}, 400, "messages[0]", None),
    "missing model": (COMPLETIONS, {"model": DROP}, 400, "model", None),
    "missing prompt": (COMPLETIONS, {"prompt": DROP}, 400, "prompt", None),
    "missing messages": (CHAT, {"messages": DROP}, 400, "messages", None),
    "unknown model": (COMPLETIONS, {"model": "gpt-9"}, 404, "model", "model_not_found"),
    "unknown model in chat": (CHAT, {"model": "gpt-9"}, 404, "model", "model_not_found"),
    "negative max_tokens": (COMPLETIONS, {"max_tokens": -5}, 400, "max_tokens", None),
    "zero max_tokens": (COMPLETIONS, {"max_tokens": 0}, 400, "max_tokens", None),
    "max_tokens past the context": (COMPLETIONS, {"max_tokens": 10**6}, 400, "max_tokens", None),
    "max_tokens past 64 bits": (COMPLETIONS, {"max_tokens": 10**30}, 400, "max_tokens", None),
    "prompt longer than the context": (COMPLETIONS, {"prompt": LONG_TEXT}, 400, "prompt", None),
    "token prompt longer than the context": (COMPLETIONS, {"prompt": [5] * 100}, 400, "prompt", None),
    "long prompt, streaming": (CHAT, {"messages": [{"role": "user", "content": LONG_TEXT}], "stream": True},
                               400, "prompt", None),
    "token id outside the vocabulary": (COMPLETIONS, {"prompt": [10**6]}, 400, "prompt", None),
    "negative token id": (COMPLETIONS, {"prompt": [-1]}, 400, "prompt[0]", None),
    "empty prompt list": (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    "empty token prompt": (COMPLETIONS, {"prompt": [[]]}, 400, "prompt", None),
    "mixed prompt list": (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt", None),
    "n zero": (COMPLETIONS, {"n": 0}, 400, "n", None),
    "n huge": (COMPLETIONS, {"n": 10**6}, 400, "n", None),
    "negative temperature": (COMPLETIONS, {"temperature": -1}, 400, "temperature", None),
    "top_p zero": (COMPLETIONS, {"top_p": 0}, 400, "top_p", None),
    "bad top_k": (COMPLETIONS, {"top_k": -7}, 400, "top_k", None),
    "empty stop string": (COMPLETIONS, {"stop": [""]}, 400, "stop", None),
    "too many logprobs": (COMPLETIONS, {"logprobs": 50}, 400, "logprobs", None),
    "top_logprobs without logprobs": (CHAT, {"top_logprobs": 2}, 400, "top_logprobs", None),
    "logit_bias key not a token": (COMPLETIONS, {"logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    "logit_bias outside the vocabulary": (COMPLETIONS, {"logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    "logit_bias too large": (COMPLETIONS, {"logit_bias": {"5": 1000}}, 400, "logit_bias", None),
    "negative seed": (COMPLETIONS, {"seed": -1}, 400, "seed", None),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    "no messages": (CHAT, {"messages": []}, 400, "messages", None),
    "image content": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None,
                      "unsupported"),
    "tool without a function": (CHAT, {"tools": [{"type": "function"}]}, 400, "tools[0].function", None),
    "tool of another type": (CHAT, {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400,
                             "tools[0].type", None),
    "auto tool choice without a parser": (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]},
                                          400, "tool_choice", None),
    "tool_choice names an unknown function": (
        CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}],
               "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", None),
    "tool_choice without tools": (CHAT, {"tool_choice": "required"}, 400, "tool_choice", None),
    "tool message without its call id": (CHAT, {"messages": [{"role": "tool", "content": "42"}]}, 400,
                                         "messages[0].tool_call_id", None),
    "tokenize nothing": ("/tokenize", {}, 400, None, None),
    "stop_token_ids outside the vocabulary": (COMPLETIONS, {"stop_token_ids": [99999]}, 400, "stop_token_ids",
                                              None),
    "penalty out of range": (COMPLETIONS, {"presence_penalty": 7}, 400, "presence_penalty", None),
    "detokenize outside the vocabulary": ("/detokenize", {"tokens": [99999]}, 400, None, None),
}


def valid_body(shim, path: str) -> dict:
    if path == COMPLETIONS:
        return {"model": shim.model, "prompt": "hi", "max_tokens": 2}
    if path == CHAT:
        return {"model": shim.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_4xx_with_error_body(shim, case):
    path, fields, status, param, code = CASES[case]
    body = {k: v for k, v in {**valid_body(shim, path), **fields}.items() if v is not DROP}
    assert_error(shim.post(path, body), status, param, code)


@pytest.mark.parametrize("body,param,code", [
    (b"{not json", None, "invalid_json"),
    (b"", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_type"),
    (b'{"model": "m", "prompt": "\xff\xfe"}', None, "invalid_encoding"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e999}', "temperature", None),
])
def test_unparsable_body(shim, body, param, code):
    assert_error(shim.post(COMPLETIONS, body), 400, param, code)


def test_oversized_body_is_413(shim):
    body = json.dumps({**valid_body(shim, COMPLETIONS), "prompt": "x" * (5 * 2**20)}).encode()
    assert_error(shim.post(COMPLETIONS, body), 413, code="body_too_large")


def test_unknown_path_and_method(shim):
    assert_error(shim.get("/v1/nothing"), 404)
    assert_error(shim.get(COMPLETIONS), 405)


# -- fuzz -----------------------------------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stream",
          "stream_options", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed",
          "logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "ignore_eos", "min_tokens", "priority", "offline", "best_of", "tokens",
          "add_special_tokens", "response_format", "guided_json", "guided_regex", "guided_grammar",
          "guided_choice", "structured_outputs"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
paths = st.sampled_from([COMPLETIONS, CHAT, "/tokenize", "/detokenize"])


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "any json":
        return json.dumps(draw(json_values)).encode()
    body = {"model": "MODEL", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "tokens": [1, 2]}
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        body[name] = draw(json_values)
    return json.dumps(body).encode()


@pytest.mark.slow
def test_fuzzed_requests_never_get_5xx(shim):
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(path=paths, body=bodies())
    def one(path, body):
        body = body.replace(b'"MODEL"', json.dumps(shim.model).encode())
        reply = shim.post(path, body)
        assert reply.status < 500, (path, body, reply.status, reply.body)
        if reply.status >= 400:
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}

    one()
    shim.wait_idle()
    ok = shim.post(COMPLETIONS, {**valid_body(shim, COMPLETIONS), "max_tokens": 3, "ignore_eos": True})
    assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert shim.get("/health").status == 200
