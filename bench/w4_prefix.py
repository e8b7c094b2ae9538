"""W4 shared prefix: 64 requests sharing a 1,024-token prefix, with and without prefix caching.

    python -m bench.w4_prefix [--requests 64] [--launch-args="..."]

Each request is the shared prefix plus 32 tokens of its own, and asks for 32 output
tokens. The first request is sent alone (so the prefix is in the cache), then the
others all at once. TTFT is reported for the concurrent ones; the hit rate is the
scheduler's ``prefix_cache_hits / prefix_cache_queries`` over the workload.
"""

from __future__ import annotations

import shlex
import sys

import uvloop

from xllm.sdk import AsyncClient

from .common import (add_launch_args, base_parser, report, resolve_model, shared_prefix_requests, summarize,
                     table, vocab_size)
from .drive import check, deployment, run_concurrent, stream_request, warm_up


async def run(address: str, requests, vocab: int, label: str) -> dict:
    """The first request alone, then the rest at once; their summary and the cache's hit rate."""
    async with AsyncClient(address) as client:
        await warm_up(client, vocab)
        before = await client.call("stats")
        first = await stream_request(client, requests[0])
        records, wall = await run_concurrent(client, requests[1:], label)
        after = await client.call("stats")
    check([first, *records], requests, label)
    out = summarize(records, wall)
    out["first_ttft"] = first.ttft
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    out["hit_rate"] = (after["prefix_cache_hits"] - before["prefix_cache_hits"]) / queries if queries else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--unique-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    requests = shared_prefix_requests(args.requests, vocab, args.prefix_len, args.unique_len,
                                      args.output_len, args.seed)
    runs = {}
    for label, extra in (("prefix caching on", []), ("prefix caching off", ["--no-prefix-caching"])):
        with deployment(model_dir, [*shlex.split(args.launch_args), *extra], label) as dep:
            runs[label] = uvloop.run(run(dep.address, requests, vocab, label))
        print(f"{label}: mean TTFT {runs[label]['ttft']['mean'] * 1000:.1f} ms", flush=True)

    on, off = runs["prefix caching on"], runs["prefix caching off"]
    rows = [[label, r["ttft"]["mean"] * 1000, r["ttft"]["median"] * 1000, r["ttft"]["p99"] * 1000,
             r["first_ttft"] * 1000, r["e2el"]["mean"], r["output_throughput"], f"{r['hit_rate']:.1%}"]
            for label, r in runs.items()]
    body = table(["xllm", "mean TTFT ms", "median TTFT ms", "p99 TTFT ms", "first request TTFT ms",
                  "mean E2EL s", "output tok/s", "prefix cache hit rate"], rows)
    ratio = off["ttft"]["mean"] / on["ttft"]["mean"]
    notes = [f"model {model_dir.name}; {args.requests} requests = a {args.prefix_len}-token shared prefix "
             f"+ {args.unique_len} own tokens, {args.output_len} output tokens, greedy, EOS ignored",
             f"the first request alone, then the other {args.requests - 1} at once; TTFT columns are over "
             "those; hit rate = cached prompt tokens / prompt tokens looked up, all requests",
             f"mean TTFT ratio off / on: {ratio:.1f}×"]
    report("W4 shared prefix", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
