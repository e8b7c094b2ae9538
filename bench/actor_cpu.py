"""CPU time each actor spends per output token of one streamed HTTP request.

    python -m bench.actor_cpu [--model preset:llama-110m-mha] [--tokens 512] [--launch-args="..."]

One request (32 prompt tokens, ``--tokens`` out, greedy, EOS ignored) through
``/v1/completions`` with ``stream: true``; every actor's user+system CPU time is read
from ``/proc/PID/stat`` before and after, and this process's own as the client's. On a
2-core machine every millisecond another actor uses is taken from the worker's threads:
this shows where (e.g. ``--stream-interval 1`` against the default). Prints; records
nothing.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time

import aiohttp

from .common import BenchRequest, add_launch_args, base_parser, resolve_model
from .drive import deployment
from .w2_online import free_port, http_request


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(url: str, model: str, n: int):
    async with aiohttp.ClientSession() as session:
        return await http_request(session, url, model, BenchRequest(list(range(100, 132)), n))


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.set_defaults(model="preset:llama-110m-mha")
    p.add_argument("--tokens", type=int, default=512)
    add_launch_args(p)
    args = p.parse_args(argv)
    from .vs_llamacpp import served_name

    model_dir = resolve_model(args.model)
    port = free_port()
    with deployment(model_dir, ["--dtype", "bfloat16", *shlex.split(args.launch_args), "--http-port", str(port)]) as dep:
        url, name = f"http://127.0.0.1:{port}/v1/completions", served_name(dep.address)
        asyncio.run(one(url, name, 16))  # warm up
        before = {k: cpu_seconds(pid) for k, pid in dep.pids.items()}
        mine = time.process_time()
        rec = asyncio.run(one(url, name, args.tokens))
        client = time.process_time() - mine
        after = {k: cpu_seconds(pid) for k, pid in dep.pids.items()}
    if not rec.ok:
        raise RuntimeError(f"the request failed: {rec.error}")
    n = rec.output_tokens
    print(f"{n} tokens, TPOT {rec.tpot * 1000:.2f} ms; CPU ms per token:")
    for k in before:
        print(f"  {k}: {(after[k] - before[k]) / n * 1000:.3f}")
    print(f"  client: {client / n * 1000:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
