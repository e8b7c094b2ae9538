"""The HTTP shim actor: an OpenAI-compatible HTTP server that is an SDK client.

It binds its TCP socket and learns the served model (``model_info``) in ``setup``, so
the launcher's "ready" means the HTTP API answers; then uvicorn serves the FastAPI app
of ``routes`` inside this actor's own event loop. Everything it asks of the engine goes
through one shared ``AsyncClient`` connected to the frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..bus.actor import Actor
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..sdk import AsyncClient
from ..sdk.errors import EngineUnavailableError
from .errors import ApiError
from .metrics import Metrics
from .routes import ShimState, build_app

log = logging.getLogger(__name__)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering requests it cannot parse (a negative
    Content-Length, a broken request line) with an OpenAI-style JSON body, not plain text."""

    def send_400_response(self, msg: str) -> None:
        body = ApiError(400, f"invalid HTTP request: {msg}", "invalid_http").response().body
        event = h11.Response(status_code=400, reason=b"Bad Request", headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")])
        self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the actor base owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpActor(Actor):
    """Serves ``/v1/completions``, ``/v1/chat/completions`` and friends over HTTP."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.spec = spec
        self.cfg = plan.engine

    async def setup(self) -> dict:
        http = self.cfg.http
        self.client = AsyncClient(self.spec.address, self.plan.key_dir)
        info = await self._model_info()
        self.sock = socket.socket(socket.AF_INET6 if ":" in http.host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((http.host, http.port))
        self.sock.listen(2048)  # NOTE: before "ready": clients connecting early wait, not fail
        self.state = ShimState(self.client, http, info["name"], info["max_model_len"],
                               Metrics(info["name"]))
        config = uvicorn.Config(build_app(self.state), lifespan="off", log_config=None, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2, http=_Protocol)
        self.server = _Server(config)
        url = f"http://{http.host}:{self.sock.getsockname()[1]}"
        log.info("serving the OpenAI-compatible API of %s at %s", info["name"], url)
        return {"url": url}

    async def _model_info(self) -> dict:
        """The frontend's ``model_info``; waits for the frontend to come up."""
        while True:
            try:
                return await self.client.call("model_info", timeout=2.0)
            except EngineUnavailableError:
                log.info("waiting for the frontend at %s", self.client.address)

    async def run(self) -> None:
        serving = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            self.state.shut_down()  # answers in progress end with a 503 error
            self.server.should_exit = True
            await asyncio.wait({serving}, timeout=5)
            raise
        finally:
            self.sock.close()
            await self.client.close()
