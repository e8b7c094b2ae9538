"""Starts the actor processes of a deployment plan, waits until they are ready, and stops them.

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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from ..bus.channel import Channel
from ..protocol import ActorDrained, ActorFailed, ActorReady, LauncherInput
from .plan import ActorSpec, DeploymentPlan

log = logging.getLogger("xllm.deploy")


class DeploymentFailed(RuntimeError):
    """An actor died or failed; the message names it."""


@dataclass
class ActorProcess:
    spec: ActorSpec
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)

    def death(self) -> str | None:
        """How it ended ("died with signal SIGKILL"), or None while it runs."""
        code = self.proc.poll() if self.proc else None
        if code is None:
            return None
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"actor {self.name} (pid {self.proc.pid}) died with {how}"


MAX_RESTARTS = 5  # of one instance within RESTART_WINDOW_S; past that the deployment stops
RESTART_WINDOW_S = 600.0


class Supervisor:
    """Owns the actor processes of one deployment plan (one per ``ActorSpec``)."""

    def __init__(self, plan: DeploymentPlan, plan_file: Path) -> None:
        self.plan = plan
        self.actors = [self._process(spec, plan_file) for spec in plan.actors]
        self.ready: dict[str, ActorReady] = {}
        self.drained: set[str] = set()  # schedulers that hold no request after a drain before stopping
        # NOTE: an instance that is one of several (here, or on other hosts through etcd)
        # is restarted when it fails while the others serve; a deployment of one instance,
        # and any dead service actor, stops (a host's supervisor, such as systemd, restarts
        # the whole launcher)
        self.restarts_instances = bool(plan.instances) and not plan.alone
        self.restarts: dict[str, deque[float]] = {}

    @staticmethod
    def _process(spec: ActorSpec, plan_file: Path) -> ActorProcess:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "XLLM_LAUNCHER_PID": str(os.getpid()), "OMP_NUM_THREADS": str(spec.threads)}
        # compiled decode graphs survive restarts in inductor's on-disk cache
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "xllm" / "inductor"))
        argv = [sys.executable, "-m", "xllm.deploy.entry", str(plan_file), spec.name]
        return ActorProcess(spec, argv, env)

    # -- start ------------------------------------------------------------------------------
    async def start(self, timeout: float) -> None:
        """Start every actor and wait for all to be ready; raises ``DeploymentFailed``."""
        ctx = zmq.asyncio.Context()
        inbox = Channel(ctx, zmq.PULL, self.plan.launcher, bind=True, union=LauncherInput)
        self._ctx, self._inbox = ctx, inbox
        for a in self.actors:
            a.start()
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.actors):
            await self._check_alive()
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
            case ActorDrained():
                self.drained.add(msg.name)
                log.info("%s holds no request: ready to stop", msg.name)
            case ActorFailed():
                # NOTE: a dead actor makes its peers fail too (a broken collective, a step
                # error); name the dead one, the root cause, when there is one.
                await asyncio.sleep(0.5)
                failed = next((a for a in self.actors if a.name == msg.name), None)
                if failed is None or (msg.pid and failed.proc and msg.pid != failed.proc.pid):
                    return  # from a process already replaced
                await self._handle_failure(failed, f"actor {msg.name} failed: {msg.message}")

    def _dead(self) -> tuple[ActorProcess, str] | None:
        """The dead actor to blame first (one killed by a signal before one that exited)."""
        dead = [(a, a.death()) for a in self.actors if a.death() is not None]
        dead.sort(key=lambda d: "signal" not in d[1])
        return dead[0] if dead else None

    async def _check_alive(self) -> None:
        dead = self._dead()
        if dead is not None:
            await self._handle_failure(*dead)

    async def _handle_failure(self, actor: ActorProcess, what: str) -> None:
        """Restart the instance ``actor`` belongs to, or stop everything (``DeploymentFailed``)."""
        root = self._dead()
        if root is not None and root[0] is not actor:
            what = f"{root[1]}; then {what}"
            actor = root[0]
        inst = actor.spec.instance
        if not (self.restarts_instances and inst):
            raise DeploymentFailed(what)
        times = self.restarts.setdefault(inst, deque())
        now = time.monotonic()
        while times and now - times[0] > RESTART_WINDOW_S:
            times.popleft()
        if len(times) >= MAX_RESTARTS:
            raise DeploymentFailed(f"instance {inst} failed {MAX_RESTARTS + 1} times in "
                                   f"{RESTART_WINDOW_S:.0f} s; last: {what}")
        times.append(now)
        log.warning("instance %s lost: %s; restarting it", inst, what)
        mine = [a for a in self.actors if a.spec.instance == inst]
        await asyncio.get_running_loop().run_in_executor(None, _stop_all, [a.proc for a in mine], 5.0)
        Path(self.plan.dist_init(inst).removeprefix("file://")).unlink(missing_ok=True)
        # NOTE: the restarted KV agent must map the pool its new worker creates, not the old
        # one: its scheduler takes requests before the worker is up, and a worker that
        # re-created the file under a mapped agent would wipe KV the agent already wrote
        for rank in range(self.plan.instance(inst).tp_size):
            Path(self.plan.kv_pool(inst, rank)).unlink(missing_ok=True)
        for a in mine:
            self.ready.pop(a.name, None)
            a.start()

    # -- serve ------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise ``DeploymentFailed`` when an actor dies."""
        while not stop.is_set():
            await self._check_alive()
            try:
                await self._read_inbox(0.1)
            except msgspec.DecodeError:
                continue

    # -- stop -------------------------------------------------------------------------------
    async def drain(self, timeout: float, hurry: asyncio.Event | None = None) -> list[str]:
        """Before a clean stop: ask every scheduler here to drain (SIGUSR1: the routers move
        its decoding requests elsewhere, the rest finish), and wait until each says it holds
        nothing, or ``timeout`` seconds (or ``hurry``). Returns the schedulers that did not."""
        schedulers = [a for a in self.actors if a.spec.kind == "scheduler" and a.death() is None]
        for a in schedulers:
            _signal(a.proc, signal.SIGUSR1)
        self.drained.clear()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (hurry is not None and hurry.is_set()) and any(
                a.name not in self.drained and a.death() is None for a in schedulers):
            try:
                await self._read_inbox(0.1)
            except msgspec.DecodeError:
                continue
        return [a.name for a in schedulers if a.name not in self.drained and a.death() is None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every live actor, SIGKILL what is left after ``grace`` seconds."""
        _stop_all([a.proc for a in self.actors], grace)
        if hasattr(self, "_inbox"):
            self._inbox.close()
            self._ctx.term()

    def pids(self) -> dict[str, int]:
        return {a.name: a.proc.pid for a in self.actors if a.proc}


def _stop_all(procs: list[subprocess.Popen | None], grace: float) -> None:
    live = [p for p in procs if p is not None and p.poll() is None]
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


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the actor and anything it started
    except ProcessLookupError:
        pass
