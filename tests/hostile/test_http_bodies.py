"""Whatever an HTTP client sends, it gets a 4xx with an OpenAI-style body; the shim serves on."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.http.shim import serve_http

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DEEP = 5000
NEST = "[" * DEEP + "]" * DEEP


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    with serve_http(make_tiny("tiny-llama"), tmp_path_factory.mktemp("hostile-http")) as s:
        yield s


def _valid(shim) -> dict:
    return {"model": shim.model, "prompt": "hi", "max_tokens": 2}


def _chat(shim) -> dict:
    return {"model": shim.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(body: dict, field: str, raw: str) -> bytes:
    """``body`` as JSON with ``field`` set to the raw JSON text ``raw``."""
    text = json.dumps({**body, field: "@@"})
    return text.replace('"@@"', raw).encode()


def assert_openai_error(status: int, body: bytes, expected: int = 400) -> dict:
    assert status == expected, (status, body[:300])
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


CASES = {
    "nested unknown field": lambda s: (COMPLETIONS, _with(_valid(s), "extra", NEST)),
    "nested tools": lambda s: (CHAT, _with(_chat(s), "tools", NEST)),
    "nested response_format": lambda s: (CHAT, _with(_chat(s), "response_format", '{"a":' + NEST + "}")),
    "nested message content": lambda s: (CHAT, _with(_chat(s), "messages", NEST)),
    "nested prompt": lambda s: (COMPLETIONS, _with(_valid(s), "prompt", NEST)),
    "nested tokenize": lambda s: ("/tokenize", _with({}, "prompt", NEST)),
    "3 MB prompt": lambda s: (COMPLETIONS, json.dumps({**_valid(s), "prompt": "x " * 1_500_000}).encode()),
    "huge integer": lambda s: (COMPLETIONS, _with(_valid(s), "max_tokens", "9" * 5000)),
    "huge float": lambda s: (COMPLETIONS, _with(_valid(s), "temperature", "1e999999")),
    "million-element stop list": lambda s: (COMPLETIONS, json.dumps({**_valid(s), "stop": [""] * 10**6}).encode()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_body_gets_a_4xx(shim, case):
    path, body = CASES[case](shim)
    reply = shim.post(path, body)
    assert_openai_error(reply.status, reply.body)
    assert shim.post(COMPLETIONS, _valid(shim)).status == 200


def _raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1, 2"])
def test_bad_content_length_gets_an_openai_body(shim, length):
    status, body = _raw_http(shim.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                        b"application/json\r\nContent-Length: " + length + b"\r\n\r\n{}")
    assert_openai_error(status, body)
    assert shim.get("/health").status == 200


def test_broken_request_line_gets_an_openai_body(shim):
    status, body = _raw_http(shim.port, b"POST\x00 /v1/completions HTTP/9\r\n\r\n")
    assert_openai_error(status, body)


@pytest.mark.slow
def test_random_bodies_never_get_5xx(shim):
    @settings(max_examples=80, deadline=None)
    @given(path=st.sampled_from([COMPLETIONS, CHAT, "/tokenize", "/detokenize"]), body=st.binary(max_size=200))
    def one(path, body):
        reply = shim.post(path, body)
        assert_openai_error(reply.status, reply.body, reply.status)
        assert 400 <= reply.status < 500

    one()
    assert shim.get("/health").status == 200
    assert shim.post(COMPLETIONS, _valid(shim)).status == 200
