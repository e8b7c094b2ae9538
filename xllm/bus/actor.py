"""The actor base: one process, one uvloop event loop, typed sockets, ready and stop.

An actor's life: ``setup()`` opens its sockets and loads what it needs, the base then
tells the launcher it is ready, and ``run()`` serves until SIGTERM/SIGINT or until
``run()`` returns. An exception that escapes ``run()`` is reported to the launcher as
``ActorFailed`` (named), and the process exits non-zero so the launcher tears the
deployment down.

NOTE (invariant): a stop request is obeyed in every phase. While ``setup()`` runs (it
may load weights and compile graphs for minutes, without yielding) SIGTERM/SIGINT end
the process at once; only a started actor stops gracefully. An actor whose launcher is
gone (it gets SIGHUP as its parent-death signal) also removes the deployment's run
directory, which the dead launcher can no longer clean up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import traceback
from typing import Any

import zmq
import zmq.asyncio

from ..protocol import ActorFailed, ActorReady
from . import curve
from .channel import Channel

log = logging.getLogger(__name__)


class Actor:
    """Base class of the frontend, scheduler and worker processes."""

    def __init__(self, name: str, launcher_address: str | None, run_dir: str | None = None,
                 key_dir: str = "") -> None:
        self.name = name
        self.key_dir = key_dir  # CURVE keys for tcp sockets (xllm.bus.curve); "" = none
        self._auth = None
        self._background: list[asyncio.Task] = []
        self._failure: BaseException | None = None
        self.launcher_address = launcher_address
        self.run_dir = run_dir  # the deployment's private directory (ipc sockets, config)
        self.ctx = zmq.asyncio.Context()
        self.channels: list[Channel] = []
        self._stopping: asyncio.Event | None = None  # created inside the loop

    # -- to override --------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        """Open sockets and load state. Returns info for the ready message."""
        return {}

    async def run(self) -> None:
        """Serve until stopped."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """After a clean stop, before the sockets close: withdraw registrations and the like."""

    # -- background tasks -------------------------------------------------------------------
    def background(self, coro) -> asyncio.Task:
        """Run ``coro`` beside ``run()``; its failure fails the actor; cancelled at the end."""
        task = asyncio.ensure_future(coro)
        self._background.append(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self._stopping is not None:
            self._failure = task.exception()
            self._stopping.set()

    # -- helpers ------------------------------------------------------------------------
    def channel(self, kind: int, address: str, *, bind: bool, union: Any = None) -> Channel:
        """A socket of this actor; a tcp one is CURVE-protected when the deployment has a key."""
        opts = curve.options(address, self.key_dir, server=bind)
        if opts and bind and self._auth is None:
            self._auth = curve.start_authenticator(self.ctx, self.key_dir)
        ch = Channel(self.ctx, kind, address, bind=bind, union=union, options=opts)
        self.channels.append(ch)
        return ch

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    async def _notify(self, msg: Any) -> None:
        if self.launcher_address is None:
            return
        ch = Channel(self.ctx, zmq.PUSH, self.launcher_address, bind=False)
        try:
            await asyncio.wait_for(ch.send(msg), timeout=5)
        finally:
            await asyncio.sleep(0.05)  # let the frame leave before the socket closes
            ch.close()

    def _exit_now(self, signum: int, _frame: Any) -> None:
        """Stop during setup: nothing is serving yet, so nothing needs a graceful end."""
        if signum == signal.SIGHUP:
            self._remove_run_dir()
        os._exit(128 + signum)

    def _stop(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._remove_run_dir()
        self._stopping.set()

    def _remove_run_dir(self) -> None:
        # NOTE: SIGHUP is this actor's parent-death signal (xllm.actors): the launcher is
        # gone and cannot remove the run directory itself
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _main(self) -> int:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in signals:
            signal.signal(sig, self._exit_now)
        try:
            info = await self.setup()
            for sig in signals:
                loop.add_signal_handler(sig, self._stop, sig)
            await self._notify(ActorReady(name=self.name, pid=os.getpid(), info=info))
            run = asyncio.ensure_future(self.run())
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                run.result()  # re-raise a failure
            else:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            if self._failure is not None:
                raise self._failure
            try:
                await asyncio.wait_for(self.teardown(), 3)
            except Exception as exc:  # noqa: BLE001 - a clean stop goes on regardless
                log.warning("%s: teardown did not finish: %r", self.name, exc)
            return 0
        except Exception as exc:  # noqa: BLE001 - reported by name, then the process ends
            log.error("%s failed:\n%s", self.name, traceback.format_exc())
            try:
                await self._notify(ActorFailed(name=self.name, message=f"{type(exc).__name__}: {exc}", pid=os.getpid()))
            except Exception:  # noqa: BLE001
                pass
            return 1
        finally:
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            for ch in self.channels:
                ch.close()
            if self._auth is not None:
                self._auth.stop()
            self.ctx.term()

    def serve(self) -> int:
        """Run the actor to completion in this process; returns the exit code."""
        import uvloop

        return uvloop.run(self._main())


def configure_logging(name: str) -> None:
    """Log lines carry the actor's name so a deployment's stderr reads as one story."""
    level = os.environ.get("XLLM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
    )
