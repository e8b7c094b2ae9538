"""Caps and deadlines: 429 past the shim's or the engine's queue cap, 408 past the
request deadline, 413 past the body cap, and ``--served-model-name``.

The deployment runs one request at a time with one waiting (``--max-num-seqs 1
--max-queued-requests 1``), lets two HTTP requests in at once, and gives each 4 s.
Where a request must still be running at some point, the test pauses the worker
(SIGSTOP) instead of relying on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest

from tests.http.shim import serve_http, sse_events
from xllm.sdk import Client

NAME = "shim-test"
LONG = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    with serve_http(make_tiny("tiny-llama"), tmp_path_factory.mktemp("http-limits"),
                    "--served-model-name", NAME, "--http-max-concurrent", "2", "--max-num-seqs", "1",
                    "--max-queued-requests", "1", "--request-timeout", "4", "--max-body-bytes", "4096") as s:
        yield s


@contextmanager
def paused(pid: int):
    """Freeze a process (e.g. the worker) for the duration of the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def error_code(reply) -> str:
    return reply.json()["error"]["code"]


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_served_model_name(shim, make_tiny):
    assert shim.get("/v1/models").json()["data"][0]["id"] == NAME
    ok = shim.post("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2})
    assert ok.status == 200 and ok.json()["model"] == NAME
    by_dir = shim.post("/v1/completions", {"model": make_tiny("tiny-llama").name, "prompt": "hi"})
    assert by_dir.status == 404 and error_code(by_dir) == "model_not_found"


@pytest.mark.slow
def test_deadline_aborts_a_non_streaming_request_with_408(shim):
    idle = shim.wait_idle()
    with paused(shim.dep.pids["worker-0"]):  # the request cannot finish before its deadline
        reply = shim.post("/v1/completions", {"model": NAME, **LONG})
    assert reply.status == 408 and error_code(reply) == "request_timeout"
    after = shim.wait_idle(timeout=15.0)
    assert after["num_running"] == 0 and after["num_aborted"] == idle["num_aborted"] + 1


@pytest.mark.slow
def test_deadline_ends_a_stream_with_an_error_event_then_done(shim):
    shim.wait_idle()
    conn, resp = _stream_first_event(shim, LONG)  # tokens are flowing
    with paused(shim.dep.pids["worker-0"]):  # ... and then stop until the deadline passes
        events = sse_events(resp.read())
    conn.close()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert shim.wait_idle(timeout=15.0)["num_running"] == 0


def test_body_over_the_cap_is_413(shim):
    big = json.dumps({"model": NAME, "prompt": "x" * 5000}).encode()
    reply = shim.post("/v1/completions", big)
    assert reply.status == 413 and error_code(reply) == "body_too_large"
    # without a Content-Length: the cap holds while the body streams in
    conn = shim.connection()
    conn.request("POST", "/v1/completions", body=iter([big[:3000], big[3000:]]), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()


def _stream_first_event(shim, body: dict):
    """Start a streaming request and read its first event; returns (connection, response)."""
    conn = shim.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({"model": NAME, "stream": True, **body}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert resp.readline() == b"\n"  # the blank line that ends the event
    return conn, resp


@pytest.mark.slow
def test_more_http_requests_than_the_cap_get_429(shim):
    shim.wait_idle()
    conn, resp = _stream_first_event(shim, LONG)  # running
    with paused(shim.dep.pids["worker-0"]):
        waiting = threading.Thread(target=shim.post, args=("/v1/completions", {"model": NAME, **LONG}))
        waiting.start()
        wait_for(lambda: shim.stats()["num_waiting"] == 1)
        third = shim.post("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2})
    assert third.status == 429 and error_code(third) == "too_many_requests"
    resp.close()
    conn.close()
    waiting.join()
    shim.wait_idle()
    assert shim.post("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}).status == 200


@pytest.mark.slow
def test_a_full_engine_queue_gets_429(shim):
    shim.wait_idle()
    with Client(shim.dep.address) as sdk:
        running = sdk.stream("long", max_tokens=2000, ignore_eos=True)
        next(running)
        with paused(shim.dep.pids["worker-0"]):
            waiting = threading.Thread(target=lambda: sdk.generate("long", max_tokens=2000, ignore_eos=True,
                                                                   req_id="waiting"))
            waiting.start()
            wait_for(lambda: sdk.call("stats")["num_waiting"] == 1)
            reply = shim.post("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert reply.status == 429 and error_code(reply) == "queue_full"
        running.close()
        sdk.abort("waiting")
        waiting.join()
    shim.wait_idle()
    assert shim.post("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}).status == 200


@pytest.mark.slow
def test_health_is_503_while_the_engine_does_not_answer(shim):
    scheduler = shim.dep.pids["scheduler"]
    os.kill(scheduler, signal.SIGSTOP)
    try:
        reply = shim.get("/health")
    finally:
        os.kill(scheduler, signal.SIGCONT)
    assert reply.status == 503 and error_code(reply) == "engine_unavailable"
    wait_for(lambda: shim.get("/health").status == 200)
