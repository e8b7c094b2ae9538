"""Helpers for the HTTP shim tests: a launched deployment with ``--http-port`` and plain
HTTP requests (``http.client``, so the SSE framing is seen byte for byte)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from openai import OpenAI

from tests.deploy import Deployment, launch
from xllm.sdk import Client


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    """One raw HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Shim:
    """A deployment serving HTTP on ``port``; ``model`` is its served name."""

    dep: Deployment
    port: int
    model: str

    def openai(self, **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0, **kwargs)

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | Any = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
        """Send one request; a non-bytes ``body`` is sent as JSON."""
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                           **(headers or {})})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def post(self, path: str, body: Any, **kwargs: Any) -> Reply:
        return self.request("POST", path, body, **kwargs)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def stats(self) -> dict:
        """The scheduler's ``stats`` (through the SDK)."""
        with Client(self.dep.address) as c:
            return c.call("stats")

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Poll ``stats`` until nothing runs, waits or holds KV blocks; the last stats."""
        deadline = time.monotonic() + timeout
        with Client(self.dep.address) as c:
            while True:
                s = c.call("stats")
                idle = s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_usage"] == 0
                if idle or time.monotonic() > deadline:
                    return s
                time.sleep(0.05)


@contextmanager
def serve_http(model: Path, tmp: Path, *args: str) -> Iterator[Shim]:
    """``xllm-launch`` with an HTTP port; the served name is ``--served-model-name`` or the
    model directory's name."""
    port = free_port()
    with launch(model, tmp, "--http-port", str(port), *args) as dep:
        ready = json.loads((tmp / "ready.json").read_text())
        assert ready["http"] == f"http://127.0.0.1:{port}"
        name = args[args.index("--served-model-name") + 1] if "--served-model-name" in args else model.name
        yield Shim(dep, port, name)


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    text = body.decode()
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        assert "\n" not in block, "one line per event"
        events.append(block.removeprefix("data: "))
    return events
