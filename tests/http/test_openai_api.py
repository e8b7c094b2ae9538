"""The OpenAI-compatible API through the official ``openai`` client and raw HTTP.

One deployment (tiny-llama, fp32) serves the whole module. Outputs are compared at
temperature 0; ``ignore_eos`` keeps the random tiny model from stopping early.
"""

from __future__ import annotations

import json
import math
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http.shim import serve_http, sse_events

GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    with serve_http(make_tiny("tiny-llama"), tmp_path_factory.mktemp("http-api")) as s:
        yield s


@pytest.fixture(scope="module")
def oai(shim):
    client = shim.openai()
    yield client
    client.close()


def count_tokens(shim, **body) -> int:
    reply = shim.post("/tokenize", body)
    assert reply.status == 200, reply.body
    return reply.json()["count"]


# -- models, health, OpenAPI ----------------------------------------------------------------
def test_models_list_the_served_name(shim, oai):
    assert [m.id for m in oai.models.list().data] == [shim.model]


def test_health_is_ok(shim):
    reply = shim.get("/health")
    assert reply.status == 200 and reply.json() == {"status": "ok"}


def test_openapi_document_declares_the_bodies(shim):
    doc = shim.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert name in doc["components"]["schemas"]
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert {"model", "prompt"} <= set(completion["required"])
    assert {"/v1/models", "/health", "/metrics"} <= set(doc["paths"])


# -- completions ----------------------------------------------------------------------------
def test_completion_stream_equals_non_stream_and_counts_usage(shim, oai):
    prompt = "The quick brown fox"
    full = oai.completions.create(model=shim.model, prompt=prompt, max_tokens=12, **GREEDY, extra_body=NO_EOS)
    assert full.object == "text_completion" and full.model == shim.model
    (choice,) = full.choices
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.prompt_tokens == count_tokens(shim, prompt=prompt)
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(oai.completions.create(model=shim.model, prompt=prompt, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY, extra_body=NO_EOS))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_token_id_prompts_equal_text_prompts(shim, oai):
    prompt = "Once upon a time"
    ids = shim.post("/tokenize", {"prompt": prompt}).json()["tokens"]
    by_text = oai.completions.create(model=shim.model, prompt=prompt, max_tokens=8, **GREEDY,
                                     extra_body=NO_EOS)
    by_ids = oai.completions.create(model=shim.model, prompt=ids, max_tokens=8, **GREEDY, extra_body=NO_EOS)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = oai.completions.create(model=shim.model, prompt=[ids, ids[:2]], max_tokens=4, **GREEDY,
                                 extra_body=NO_EOS)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == by_text.choices[0].text[: len(two.choices[0].text)]
    assert two.usage.prompt_tokens == len(ids) + 2 and two.usage.completion_tokens == 8


def test_return_token_ids_gives_the_output_tokens(shim):
    """vLLM's ``return_token_ids``: the ids detokenize to the text, streamed or not, and
    resending them continues the sequence exactly (what a multi-turn client needs)."""
    body = {"model": shim.model, "prompt": "Once upon a time", "max_tokens": 10, "return_token_ids": True,
            **GREEDY, **NO_EOS}
    full = shim.post("/v1/completions", body).json()["choices"][0]
    assert len(full["token_ids"]) == 10
    assert shim.post("/detokenize", {"tokens": full["token_ids"]}).json()["prompt"] == full["text"]
    events = sse_events(shim.post("/v1/completions", {**body, "stream": True}).body)
    streamed = [i for e in events[:-1] for c in json.loads(e)["choices"] for i in c["token_ids"]]
    assert streamed == full["token_ids"]
    plain = shim.post("/v1/completions", {**body, "return_token_ids": False}).json()["choices"][0]
    assert "token_ids" not in plain and plain["text"] == full["text"]
    chat = shim.post("/v1/chat/completions", {"model": shim.model, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 5, "return_token_ids": True, **GREEDY, **NO_EOS})
    assert len(chat.json()["choices"][0]["token_ids"]) == 5


def test_n_choices_differ_and_repeat_with_a_seed(shim, oai):
    def run():
        r = oai.completions.create(model=shim.model, prompt="Hello", n=2, max_tokens=16, temperature=1.0,
                                   seed=7, extra_body=NO_EOS)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)], r.usage

    texts, usage = run()
    assert len(texts) == 2 and texts[0] != texts[1]
    assert run()[0] == texts
    assert usage.completion_tokens == 32 and usage.prompt_tokens == count_tokens(shim, prompt="Hello")

    seen: dict[int, list[str]] = {0: [], 1: []}
    reasons = {}
    for chunk in oai.completions.create(model=shim.model, prompt="Hello", n=2, max_tokens=16, temperature=1.0,
                                        seed=7, stream=True, extra_body=NO_EOS):
        for c in chunk.choices:
            seen[c.index].append(c.text)
            reasons[c.index] = c.finish_reason
    assert ["".join(seen[0]), "".join(seen[1])] == texts
    assert reasons == {0: "length", 1: "length"}


def test_stop_string_ends_the_text_and_never_leaks(shim, oai):
    prompt = "In the beginning"
    base = oai.completions.create(model=shim.model, prompt=prompt, max_tokens=40, **GREEDY,
                                  extra_body=NO_EOS).choices[0].text
    mid = len(base) // 2
    stop = base[mid:mid + 3]
    assert len(stop) == 3
    expected = base[: base.find(stop)]
    full = oai.completions.create(model=shim.model, prompt=prompt, max_tokens=40, stop=[stop], **GREEDY,
                                  extra_body=NO_EOS).choices[0]
    assert (full.text, full.finish_reason) == (expected, "stop")
    pieces = [c.choices[0].text for c in oai.completions.create(
        model=shim.model, prompt=prompt, max_tokens=40, stop=stop, stream=True, **GREEDY, extra_body=NO_EOS)]
    assert "".join(pieces) == expected and stop not in "".join(pieces)


def test_echo_puts_the_prompt_first(shim, oai):
    r = oai.completions.create(model=shim.model, prompt="Echo me", max_tokens=3, echo=True, **GREEDY,
                               extra_body=NO_EOS)
    assert r.choices[0].text.startswith("Echo me") and len(r.choices[0].text) > len("Echo me")


# -- chat -----------------------------------------------------------------------------------
def test_chat_stream_equals_non_stream_and_counts_usage(shim, oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    full = oai.chat.completions.create(model=shim.model, messages=messages, max_tokens=10, **GREEDY,
                                       extra_body=NO_EOS)
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == count_tokens(shim, messages=messages)
    assert full.usage.completion_tokens == 10

    chunks = list(oai.chat.completions.create(model=shim.model, messages=messages, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY,
                                              extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_n2_streams_both_choices(shim, oai):
    got: dict[int, str] = {0: "", 1: ""}
    for chunk in oai.chat.completions.create(model=shim.model, messages=[{"role": "user", "content": "hi"}],
                                             n=2, max_tokens=6, temperature=1.0, seed=3, stream=True,
                                             extra_body=NO_EOS):
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
    assert got[0] and got[1] and got[0] != got[1]


# -- logprobs (need the worker sampler's logprobs; RequestDelta.logprobs is None before) ----
def test_completion_logprobs(shim, oai):
    r = oai.completions.create(model=shim.model, prompt="Numbers:", max_tokens=5, logprobs=2, **GREEDY,
                               extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    assert lp is not None, "the engine sent no logprobs"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert sampled <= 0 and 1 <= len(top) <= 3
        assert math.isclose(sampled, max(top.values()), abs_tol=1e-4)  # greedy takes the best
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(shim, oai):
    r = oai.chat.completions.create(model=shim.model, messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode(errors="replace") is not None
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-4)


# -- tokenize / detokenize ------------------------------------------------------------------
def test_tokenize_detokenize_round_trip(shim):
    ids = shim.post("/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    assert shim.post("/detokenize", {"tokens": ids}).json() == {"prompt": "hello world"}


# -- raw SSE framing ------------------------------------------------------------------------
def test_sse_framing_and_usage_chunk(shim):
    reply = shim.post("/v1/chat/completions", {
        "model": shim.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


# -- metrics --------------------------------------------------------------------------------
def scrape(shim) -> dict[str, list]:
    reply = shim.get("/metrics")
    assert reply.status == 200
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for got, v in metrics.get(name, []) if all(got.get(k) == x for k, x in labels.items()))


def test_metrics_count_the_requests_sent(shim, oai):
    shim.wait_idle()
    before = scrape(shim)
    prompts = ["one", "two two", "three three three"]
    for p in prompts:
        oai.completions.create(model=shim.model, prompt=p, max_tokens=4, extra_body=NO_EOS)
    messages = [{"role": "user", "content": "four"}]
    list(oai.chat.completions.create(model=shim.model, messages=messages, max_tokens=3, stream=True,
                                     extra_body=NO_EOS))
    shim.wait_idle()
    after = scrape(shim)

    def diff(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_tokens = sum(count_tokens(shim, prompt=p) for p in prompts) + count_tokens(shim, messages=messages)
    assert diff("xllm:request_success_total", finished_reason="length") == 4
    assert diff("xllm:prompt_tokens_total") == prompt_tokens
    assert diff("xllm:generation_tokens_total") == 3 * 4 + 3
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert diff(f"xllm:{hist}_count") == 4, hist
    assert diff("xllm:inter_token_latency_seconds_count") == 3 * 3 + 2
    assert diff("xllm:http_requests_total", path="/v1/completions", status="200") == 3
    assert diff("xllm:http_requests_total", path="/v1/chat/completions", status="200") == 1
    assert value(after, "xllm:num_requests_running") == 0
    assert value(after, "xllm:num_requests_waiting") == 0
    assert value(after, "xllm:kv_cache_usage_perc") == 0


# -- a client that leaves ------------------------------------------------------------------
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}


@pytest.mark.slow
def test_disconnect_mid_stream_frees_the_kv(shim):
    idle = shim.wait_idle()
    conn = shim.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({"model": shim.model, "prompt": "long story",
                                                             "stream": True, **LONG}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(6):  # a few events: the request is running
        assert resp.readline()
    running = shim.stats()
    assert running["num_running"] == 1 and running["kv_usage"] > 0
    resp.close()
    conn.close()
    after = shim.wait_idle(timeout=10.0)
    assert (after["num_running"], after["kv_usage"]) == (0, idle["kv_usage"])
    assert after["num_aborted"] == idle["num_aborted"] + 1


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_non_streaming_answer_aborts(shim):
    idle = shim.wait_idle()
    conn = shim.connection(timeout=0.3)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": shim.model, "prompt": "long", **LONG}),
                 headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    after = shim.wait_idle(timeout=10.0)
    assert (after["num_running"], after["kv_usage"]) == (0, idle["kv_usage"])
    assert after["num_aborted"] == idle["num_aborted"] + 1
    time.sleep(0.1)
    assert shim.get("/health").status == 200
