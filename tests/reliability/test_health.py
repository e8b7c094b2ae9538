"""/health means "a step can run": it fails while the worker is frozen, and recovers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.http.shim import serve_http
from xllm.sdk import Client


def _wait_for_status(shim, status: int, limit_s: float = 60.0):
    deadline = time.monotonic() + limit_s  # a bound on the test, not a measurement
    while True:
        reply = shim.get("/health")
        if reply.status == status or time.monotonic() > deadline:
            return reply
        time.sleep(0.25)


@pytest.mark.slow
def test_health_fails_while_the_worker_is_stopped(make_tiny, tmp_path):
    with serve_http(make_tiny("tiny-llama"), tmp_path, "--worker-stall-timeout", "2") as shim:
        worker = shim.dep.pids["worker-0"]
        assert shim.get("/health").status == 200
        # idle: the worker stops answering the scheduler's heartbeats
        os.kill(worker, signal.SIGSTOP)
        try:
            reply = _wait_for_status(shim, 503)
            assert reply.status == 503, reply.body
            assert "worker-0" in reply.json()["error"]["message"]
        finally:
            os.kill(worker, signal.SIGCONT)
        assert _wait_for_status(shim, 200).status == 200
        # busy: a step that never ends (the worker stops mid-request)
        result: dict = {}

        def long_request() -> None:
            with Client(shim.dep.address) as c:
                result["out"] = c.generate(prompt_token_ids=[5, 6, 7], max_tokens=400, ignore_eos=True,
                                           temperature=0.0)

        t = threading.Thread(target=long_request)
        t.start()
        while shim.stats()["num_running"] == 0:
            time.sleep(0.02)
        os.kill(worker, signal.SIGSTOP)
        try:
            assert _wait_for_status(shim, 503).status == 503
        finally:
            os.kill(worker, signal.SIGCONT)
        t.join(timeout=120)
        assert len(result["out"].token_ids) == 400  # the request survived the pause
        assert _wait_for_status(shim, 200).status == 200
