"""Request latency of one instance, sequential: what each request pays besides its tokens.

    python -m bench.request_latency [--model preset:tiny-llama] [--requests 300]

One deployment (eager, no prefix cache), ``--requests`` sequential 1-token requests and
a fifth as many 64-token ones, after 10 of warm-up; median and mean per request. To
compare with an older checkout (e.g. before the router), run the same file with that
checkout first on ``PYTHONPATH`` and ``XLLM_OLD_HARNESS=1`` (the harness was
``xllm.deployment`` then).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from xllm.sdk import AsyncClient

from .common import base_parser, report, resolve_model, table


async def run(address: str, n: int, max_tokens: int) -> list[float]:
    async with AsyncClient(address) as c:
        for _ in range(10):
            await c.generate(prompt_token_ids=[3, 4, 5, 6], max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            await c.generate(prompt_token_ids=[3 + k % 50, 4, 5, 6], max_tokens=max_tokens, ignore_eos=True,
                             temperature=0.0)
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.set_defaults(model="preset:tiny-llama")
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args(argv)
    if os.environ.get("XLLM_OLD_HARNESS"):
        from xllm.deployment import launch
    else:
        from xllm.deploy.harness import launch
    model = resolve_model(args.model)
    rows = []
    with launch(model, Path(tempfile.mkdtemp(prefix="xllm-bench-")), "--enforce-eager", "--no-prefix-caching") as dep:
        for max_tokens, n in ((1, args.requests), (64, max(1, args.requests // 5))):
            t = asyncio.run(run(dep.address, n, max_tokens))
            rows.append([max_tokens, n, statistics.median(t) * 1000, statistics.mean(t) * 1000])
            print(f"max_tokens {max_tokens}: median {rows[-1][2]:.2f} ms", flush=True)
    body = table(["output tokens", "requests", "median ms", "mean ms"], rows)
    report("Request latency, one instance", body, args, [f"model {model.name}, eager, no prefix cache, sequential"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
