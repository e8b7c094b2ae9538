"""``--api-key``: every route but /health needs the key; a missing or wrong key gets 401
with an OpenAI-style body, and the official client works with the right one."""

from __future__ import annotations

import openai
import pytest

from tests.http.shim import serve_http

KEY = "sk-test-7f3a"


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    with serve_http(make_tiny("tiny-llama"), tmp_path_factory.mktemp("key"), "--api-key", KEY) as s:
        yield s


@pytest.mark.parametrize("headers,why", [({}, "no API key"), ({"Authorization": "Bearer sk-wrong"}, "a wrong API key"),
                                         ({"Authorization": KEY}, "a wrong API key")])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                                         ("POST", "/tokenize")])
def test_without_the_key_every_route_is_refused(shim, headers, why, method, path):
    body = {"model": shim.model, "prompt": "hi", "max_tokens": 2} if method == "POST" else None
    reply = shim.request(method, path, body, headers=headers)
    assert reply.status == 401
    err = reply.json()["error"]
    assert err["code"] == "invalid_api_key" and why in err["message"]


def test_health_is_open_and_the_right_key_gets_in(shim):
    assert shim.request("GET", "/health").status == 200
    ok = shim.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200 and ok.json()["data"][0]["id"] == shim.model


def test_the_openai_client_with_and_without_the_key(shim):
    base = f"http://127.0.0.1:{shim.port}/v1"
    good = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    out = good.completions.create(model=shim.model, prompt="hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
