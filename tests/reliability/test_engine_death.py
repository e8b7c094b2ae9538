"""SDK calls in flight fail with a clear error when the deployment dies; none hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from tests.deploy import launch, wait_gone
from xllm.sdk import AsyncClient, Client, EngineUnavailableError

LONG = dict(prompt_token_ids=[3, 4, 5], max_tokens=2000, ignore_eos=True, temperature=0.0)


async def _in_flight_when_killed(address: str, worker_pid: int) -> list:
    async with AsyncClient(address) as c:
        await c.generate(prompt_token_ids=[1, 2], max_tokens=2)  # connected and serving

        async def streamed():
            async for _ in c.stream(**LONG):
                pass

        tasks = [asyncio.ensure_future(c.generate(**LONG)), asyncio.ensure_future(streamed())]
        while (await c.call("stats"))["num_running"] < 2:
            await asyncio.sleep(0.02)
        os.kill(worker_pid, signal.SIGKILL)
        # NOTE: the wait_for bounds the test; the SDK must fail these well before it
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        with pytest.raises(EngineUnavailableError):
            await c.generate(prompt_token_ids=[1], max_tokens=1)  # a new request fails at once
        with pytest.raises(EngineUnavailableError):
            await c.call("stats")
    return results


def test_async_requests_fail_when_the_engine_dies(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--max-model-len", "2048") as dep:
        pids = list(dep.pids.values())
        results = asyncio.run(_in_flight_when_killed(dep.address, dep.pids["worker-0"]))
        assert dep.proc.wait(timeout=60) != 0
        assert wait_gone(pids) == []
    assert all(isinstance(r, EngineUnavailableError) and r.code == "disconnected" for r in results), results


def test_blocking_client_fails_when_the_engine_dies(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--max-model-len", "2048") as dep:
        outcome: dict = {}
        with Client(dep.address) as c:
            c.generate(prompt_token_ids=[1, 2], max_tokens=2)

            def run() -> None:
                try:
                    outcome["done"] = c.generate(**LONG)
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    outcome["error"] = exc

            t = threading.Thread(target=run)
            t.start()
            while c.call("stats")["num_running"] == 0:
                time.sleep(0.02)
            os.kill(dep.pids["frontend"], signal.SIGKILL)
            t.join(timeout=120)
            assert not t.is_alive(), "Client.generate still blocked after the deployment died"
        assert isinstance(outcome.get("error"), EngineUnavailableError), outcome
