"""A deployment stops cleanly: on SIGINT/SIGTERM, and when any one actor dies."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.deploy import launch, wait_gone
from xllm.sdk import AsyncClient


async def _one_request(address: str) -> list[int]:
    async with AsyncClient(address) as c:
        done = await c.generate(prompt_token_ids=[1, 2, 3], max_tokens=4, temperature=0.0)
    return done.token_ids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything(sig, make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path) as dep:
        assert len(asyncio.run(_one_request(dep.address))) == 4
        pids = list(dep.pids.values())
        assert dep.stop(sig) == 0
        assert wait_gone(pids) == []
        assert "shutting down" in dep.output()


@pytest.mark.parametrize("victim", ["worker-0", "scheduler", "frontend"])
def test_dead_actor_is_named_and_everything_stops(victim, make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path) as dep:
        pids = list(dep.pids.values())
        os.kill(dep.pids[victim], signal.SIGKILL)
        code = dep.proc.wait(timeout=30)
        assert code != 0
        assert f"actor {victim} (pid {dep.pids[victim]}) died with signal SIGKILL" in dep.output()
        assert wait_gone(pids) == []


def test_killed_launcher_leaves_no_orphans(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path) as dep:
        pids = list(dep.pids.values())
        dep.proc.kill()  # no chance to clean up: the actors must notice on their own
        dep.proc.wait(timeout=10)
        assert wait_gone(pids) == []
