"""Killing one of two instances mid-run: no hang, no request silently lost, the other
instance keeps serving, and the lost one comes back.

With ``round_robin`` and two instances, consecutive requests alternate between them, and
with ``--max-num-seqs 2`` each instance runs two requests while the rest wait. So at the
kill the lost instance holds one streaming HTTP request, one streaming SDK request, and
two SDK requests that streamed nothing yet: the first two must end with the clear error,
the other two must be re-sent and complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import pytest

from tests.http.shim import serve_http, sse_events
from xllm.sdk import AsyncClient

MAX_TOKENS = 1500
PROMPT = [5, 6, 7, 8]


def http_stream(shim, started: threading.Event) -> list[dict]:
    """A streaming completion; its SSE events, decoded (``[DONE]`` as a string)."""
    conn = shim.connection(timeout=300)
    body = {"model": shim.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    raw = b""
    while chunk := resp.read1(65536):
        raw += chunk
        if b"\n\n" in raw:
            started.set()
    conn.close()
    return [e if e == "[DONE]" else json.loads(e) for e in sse_events(raw)]


def num_instances(shim) -> float:
    text = shim.get("/metrics").body.decode()
    return float(re.search(r"^xllm:num_instances\{[^}]*\} (\S+)$", text, re.M).group(1))


def wait_until(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout  # a bound, not a measurement
    while not check():
        assert time.monotonic() < deadline, f"not seen within {timeout} s: {what}"
        time.sleep(0.1)


async def sdk_streams(address: str, n: int, kill, streamed_needed: int):
    """``n`` streaming requests; ``kill()`` once ``streamed_needed`` of them streamed a token.
    Returns each one's (tokens, finish_reason, error)."""
    async with AsyncClient(address) as c:
        tokens = [0] * n

        async def one(k: int):
            reason = error = None
            async for d in c.stream(prompt_token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    temperature=0.0):
                tokens[k] += len(d.token_ids)
                reason, error = d.finish_reason or reason, d.error or error
            return tokens[k], reason, error

        tasks = [asyncio.ensure_future(one(k)) for k in range(n)]
        for _ in range(3000):  # bounded: 5 min
            if sum(t > 0 for t in tokens) >= streamed_needed:
                break
            await asyncio.sleep(0.1)
        assert sum(t > 0 for t in tokens) == streamed_needed, tokens  # the others wait
        kill()
        return await asyncio.wait_for(asyncio.gather(*tasks), 300)  # bounds the test


class CountWatch(threading.Thread):
    """Records ``xllm:num_instances`` as /metrics shows it, until ``stop``."""

    def __init__(self, shim) -> None:
        super().__init__(daemon=True)
        self.shim, self.stop, self.seen = shim, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.append(num_instances(self.shim))
            except OSError:  # the deployment is stopping (the test failed)
                return
            time.sleep(0.05)


async def placed_on_both(address: str) -> dict:
    async with AsyncClient(address) as c:
        await asyncio.gather(*(c.generate(prompt_token_ids=PROMPT, max_tokens=4) for _ in range(4)))
        return await c.call("stats")


@pytest.mark.slow
def test_killing_an_instance_loses_no_request_and_it_comes_back(make_tiny, tmp_path):
    with serve_http(make_tiny("tiny-llama"), tmp_path, "--instances", "2", "--router-policy", "round_robin",
                    "--max-num-seqs", "2", "--max-model-len", "2048") as shim:
        assert num_instances(shim) == 2
        started = [threading.Event(), threading.Event()]
        http_results: list = [None, None]

        def run_http(k: int) -> None:
            http_results[k] = http_stream(shim, started[k])

        threads = [threading.Thread(target=run_http, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for s in started:
            assert s.wait(300), "an HTTP stream did not start"
        watch = CountWatch(shim)
        watch.start()
        victim = shim.dep.pids["i1.worker-0"]
        sdk_results = asyncio.run(sdk_streams(shim.dep.address, 6, lambda: os.kill(victim, signal.SIGKILL),
                                              streamed_needed=2))
        for t in threads:
            t.join(300)
            assert not t.is_alive(), "an HTTP stream hangs"

        # the SDK: one running request of the lost instance ends with the error; its two
        # waiting ones were re-sent and complete, as do the other instance's three
        errors = [r for r in sdk_results if r[1] == "error"]
        done = [r for r in sdk_results if r[1] == "length"]
        assert len(errors) == 1 and len(done) == 5, sdk_results
        assert "lost" in errors[0][2] and 0 < errors[0][0] < MAX_TOKENS
        assert all(tokens == MAX_TOKENS for tokens, _, _ in done)

        # HTTP: one stream completes, the other ends with an OpenAI-style error event
        assert all(events[-1] == "[DONE]" for events in http_results)
        failed, finished = sorted(http_results, key=lambda events: "error" not in events[-2])
        assert failed[-2]["error"]["code"] == "instance_lost", failed[-3:]
        assert any(c.get("text") for e in failed[:-2] for c in e.get("choices", [])), "it had streamed"
        assert any(c["finish_reason"] == "length" for e in finished[:-1] for c in e.get("choices", []))

        # the count dropped to one, and is back to two once the instance is restarted
        wait_until(lambda: num_instances(shim) == 2, "the restarted instance registered", 300)
        watch.stop.set()
        watch.join()
        assert [2, 1, 2] == [v for k, v in enumerate(watch.seen) if k == 0 or watch.seen[k - 1] != v], watch.seen
        lost = re.search(r"^xllm:instances_lost\{[^}]*\} (\S+)$", shim.get("/metrics").body.decode(), re.M)
        assert float(lost.group(1)) >= 1
        stats = asyncio.run(placed_on_both(shim.dep.address))
        assert stats["num_instances"] == 2
        assert all(s["num_finished"] > 0 for s in stats["instances"].values()), stats["instances"]
        assert shim.dep.proc.poll() is None, "the deployment went down"
