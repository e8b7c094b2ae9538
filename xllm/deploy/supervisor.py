"""Starts a deployment's actor processes, waits until they are ready, and stops them.

NOTE (invariant): no orphan processes, no hang. Every actor is started with a
parent-death signal, so it ends even if the launcher is killed outright; when any
actor dies or reports a failure, the supervisor names it and stops all the others
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from .bus.channel import Channel
from .config import EngineConfig
from .protocol import ActorFailed, ActorReady, LauncherInput

log = logging.getLogger("xllm.launch")


class DeploymentFailed(RuntimeError):
    """An actor died or failed; the message names it."""


@dataclass
class ActorProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None


class Supervisor:
    """Owns the actor processes of one deployment."""

    def __init__(self, cfg: EngineConfig, config_file: Path) -> None:
        self.cfg = cfg
        self.actors = self._plan(cfg, config_file)
        self.ready: dict[str, ActorReady] = {}

    def _plan(self, cfg: EngineConfig, config_file: Path) -> list[ActorProcess]:
        base = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "XLLM_LAUNCHER_PID": str(os.getpid())}
        # compiled decode graphs survive restarts in inductor's on-disk cache
        base.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "xllm" / "inductor"))
        py = [sys.executable, "-m", "xllm.actors"]
        tp = cfg.parallel.tp_size
        threads = cfg.parallel.threads_per_worker  # resolved by the launcher
        actors = [ActorProcess(f"worker-{r}", py + ["worker", str(config_file), str(r)],
                               {**base, "OMP_NUM_THREADS": str(threads)}) for r in range(tp)]
        light = {**base, "OMP_NUM_THREADS": "1"}
        actors.append(ActorProcess("scheduler", py + ["scheduler", str(config_file)], light))
        actors.append(ActorProcess("frontend", py + ["frontend", str(config_file)], light))
        if cfg.http.port:
            actors.append(ActorProcess("http", py + ["http", str(config_file)], light))
        return actors

    # -- start ------------------------------------------------------------------------------
    async def start(self, timeout: float) -> None:
        """Start every actor and wait for all to be ready; raises ``DeploymentFailed``."""
        ctx = zmq.asyncio.Context()
        inbox = Channel(ctx, zmq.PULL, self.cfg.addresses.launcher, bind=True, union=LauncherInput)
        self._ctx, self._inbox = ctx, inbox
        for a in self.actors:
            a.proc = subprocess.Popen(a.argv, env=a.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.actors):
            self._check_alive()
            if time.monotonic() > deadline:
                missing = [a.name for a in self.actors if a.name not in self.ready]
                raise DeploymentFailed(f"actors not ready after {timeout:.0f} s: {', '.join(missing)}")
            await self._read_inbox(0.1)

    async def _read_inbox(self, wait: float) -> None:
        if not await self._inbox.sock.poll(int(wait * 1000)):
            return
        msg = await self._inbox.recv()
        match msg:
            case ActorReady():
                self.ready[msg.name] = msg
                log.info("%s ready (pid %d)", msg.name, msg.pid)
            case ActorFailed():
                # NOTE: a dead actor makes its peers fail too (a broken collective, a step
                # error); name the dead one, the root cause, when there is one.
                await asyncio.sleep(0.5)
                self._check_alive(also=f"; then actor {msg.name} failed: {msg.message}")
                raise DeploymentFailed(f"actor {msg.name} failed: {msg.message}")

    def _check_alive(self, also: str = "") -> None:
        for a in self.actors:
            code = a.proc.poll() if a.proc else None
            if code is not None and code < 0:  # killed by a signal: the root cause first
                raise DeploymentFailed(
                    f"actor {a.name} (pid {a.proc.pid}) died with signal {signal.Signals(-code).name}{also}")
        for a in self.actors:
            code = a.proc.poll() if a.proc else None
            if code is not None:
                raise DeploymentFailed(f"actor {a.name} (pid {a.proc.pid}) died with exit code {code}{also}")

    # -- serve ------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise ``DeploymentFailed`` when an actor dies."""
        while not stop.is_set():
            self._check_alive()
            try:
                await self._read_inbox(0.1)
            except msgspec.DecodeError:
                continue

    # -- stop -------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every live actor, SIGKILL what is left after ``grace`` seconds."""
        live = [a.proc for a in self.actors if a.proc and a.proc.poll() is None]
        for p in live:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0f s; killing it", p.pid, grace)
                _signal(p, signal.SIGKILL)
                p.wait()
        if hasattr(self, "_inbox"):
            self._inbox.close()
            self._ctx.term()

    def pids(self) -> dict[str, int]:
        return {a.name: a.proc.pid for a in self.actors if a.proc}


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the actor and anything it started
    except ProcessLookupError:
        pass
