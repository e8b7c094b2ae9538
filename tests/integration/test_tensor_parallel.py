"""Tensor parallelism over worker processes gives the single-process output."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.deploy import launch, wait_gone
from tests.integration.test_equality import MAX_TOKENS, workload
from tests.reference import assert_greedy_equal, generate_all, hf_greedy
from xllm.sdk import AsyncClient


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("extra", [[], ["--micro-batch-overlap"], ["--no-shm-collectives"],
                                   ["--no-shm-collectives", "--micro-batch-overlap"]],
                         ids=["tp2", "tp2-overlap", "tp2-gloo", "tp2-gloo-overlap"])
def test_tp2_matches_transformers(preset, extra, make_tiny, tmp_path):
    """Shared-memory collectives (the CPU default) and gloo ones, each with and without
    micro-batch overlap."""
    path = make_tiny(preset)
    prompts = workload()
    flags = ["--tp", "2", "--threads-per-worker", "1", *extra]
    with launch(path, tmp_path, *flags) as dep:
        assert {"worker-0", "worker-1"} <= set(dep.pids)
        ours = asyncio.run(generate_all(dep.address, prompts, MAX_TOKENS))
        log = dep.output()
    path_used = "gloo" if "--no-shm-collectives" in extra else "shared memory"
    for rank in (0, 1):
        assert f"rank {rank} of 2: collectives through {path_used}" in log
    for prompt, n, out in zip(prompts, MAX_TOKENS, ours):
        assert_greedy_equal(str(path), prompt, out, hf_greedy(str(path), prompt, n))


async def _keep_busy(address: str) -> None:
    async with AsyncClient(address) as c:
        await asyncio.wait_for(c.generate(prompt_token_ids=[1] * 50, max_tokens=1000,
                                          ignore_eos=True, temperature=0.0), timeout=60)


@pytest.mark.slow
def test_killing_one_rank_mid_run_stops_everything(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--tp", "2", "--threads-per-worker", "1") as dep:
        pids = list(dep.pids.values())
        async def run():
            task = asyncio.ensure_future(_keep_busy(dep.address))
            await asyncio.sleep(1.0)  # mid-generation
            os.kill(dep.pids["worker-1"], signal.SIGKILL)
            code = await asyncio.to_thread(dep.proc.wait, 30)
            task.cancel()
            return code
        assert asyncio.run(run()) != 0
        assert f"actor worker-1 (pid {dep.pids['worker-1']}) died with signal SIGKILL" in dep.output()
        assert wait_gone(pids, 20) == []
