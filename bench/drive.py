"""Drive a live deployment through the SDK and record every request's timeline.

``deployment`` starts ``xllm-launch`` the way a user does (``xllm.deploy.harness.launch``);
``run_concurrent`` sends a workload all at once and streams every request, so each
record holds the arrival time of every step's tokens.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from xllm.deploy.harness import Deployment, launch
from xllm.sdk import AsyncClient

from .common import BenchRequest, RequestRecord


def progress(total: int, desc: str) -> tqdm:
    """A progress bar on stderr that leaves no line behind."""
    return tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True)


@contextmanager
def deployment(model_dir: Path, launch_args: list[str], label: str = "xllm") -> Iterator[Deployment]:
    """A running deployment of ``model_dir`` with extra ``xllm-launch`` flags; stopped on exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="xllm-bench-"))
    print(f"launching {label}: xllm-launch --model {model_dir} {' '.join(launch_args)}", flush=True)
    try:
        t0 = time.perf_counter()
        with launch(model_dir, run_dir, *launch_args, timeout=1800.0) as dep:  # a cold compile on a busy machine
            print(f"  ready in {time.perf_counter() - t0:.1f} s: "
                  + ", ".join(f"{k} pid {v}" for k, v in dep.pids.items()), flush=True)
            yield dep
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def stream_request(client: AsyncClient, req: BenchRequest) -> RequestRecord:
    """Send one greedy, ignore-EOS request and record when each of its tokens arrived."""
    rec = RequestRecord(len(req.prompt), time.perf_counter())
    try:
        async for delta in client.stream(prompt_token_ids=req.prompt, max_tokens=req.max_tokens,
                                         temperature=0.0, ignore_eos=True):
            if delta.token_ids:
                rec.add(time.perf_counter(), len(delta.token_ids))
    except Exception as exc:  # a failed request is counted, not fatal
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


async def run_concurrent(client: AsyncClient, requests: list[BenchRequest],
                         desc: str = "xllm") -> tuple[list[RequestRecord], float]:
    """Send every request at once; returns the records (in order) and the wall time."""
    bar = progress(len(requests), desc)

    async def one(req: BenchRequest) -> RequestRecord:
        rec = await stream_request(client, req)
        bar.update(1)
        return rec

    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - t0
    bar.close()
    return list(records), wall


async def warm_up(client: AsyncClient, vocab_size: int, n: int = 4) -> None:
    """Wait until ready, then run a few short requests so first-step costs are paid."""
    await client.wait_ready(60)
    reqs = [BenchRequest(list(range(10 + i, 74 + i)), 8) for i in range(n)]
    recs = await asyncio.gather(*(stream_request(client, r) for r in reqs))
    failed = [r.error for r in recs if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


def check(records: list[RequestRecord], requests: list[BenchRequest], label: str) -> None:
    """Fail loudly if a request failed or came back with another length than asked."""
    for rec, req in zip(records, requests):
        if not rec.ok:
            raise RuntimeError(f"{label}: a request failed: {rec.error}")
        if rec.output_tokens != req.max_tokens:
            raise RuntimeError(f"{label}: asked for {req.max_tokens} tokens, got {rec.output_tokens}")
