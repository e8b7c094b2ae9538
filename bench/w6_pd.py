"""W6 long-prompt interference: steady decode traffic while long prompts arrive, on one
mixed instance (chunked prefill) against one prefill + one decode instance (``--pd 1:1``),
the same two cores.

    python -m bench.w6_pd [--streams 8] [--duration 40] [--long-len 4064] [--bursts 3]

Steady traffic: ``--streams`` clients, each sending one request after another (prompt
``--stream-prompt`` random tokens, ``--stream-len`` output tokens, greedy, EOS ignored)
for ``--duration`` seconds. Bursts: ``--bursts`` times (evenly spread, the first after a
tenth of the run), ``--burst-size`` prompts of ``--long-len`` tokens arrive at once
(``--long-out`` output tokens each). The mixed instance has both cores (2 threads) and
the chunked-prefill budget ``--chunk``; with PD each instance has one.

Reported per configuration: the steady requests' time per output token (TPOT mean and
p99 over requests) and inter-token gaps (p50, p99 over every gap: what a reader sees
stall when a long prompt lands), the long prompts' TTFT, and goodput: requests per second
that met the SLOs (``--slo``, steady and long alike).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import uvloop

from xllm.sdk import AsyncClient

from .common import (BenchRequest, RequestRecord, add_launch_args, base_parser, meets_slos, parse_slos, random_prompt,
                     report, resolve_model, stats, table, vocab_size)
from .drive import deployment, stream_request, warm_up

CONFIGS = {
    "mixed (1 instance, 2 threads, chunked prefill)": ["--threads-per-worker", "2"],
    "PD (1 prefill + 1 decode, 1 thread each)": ["--pd", "1:1", "--threads-per-worker", "1"],
    "PD, short prompts decoded locally (--pd-short-prompt 256)": ["--pd", "1:1", "--threads-per-worker", "1",
                                                                  "--pd-short-prompt", "256"],
}


async def run(address: str, args, vocab: int) -> tuple[list[RequestRecord], list[RequestRecord], float, dict]:
    rng = random.Random(args.seed)
    async with AsyncClient(address) as c:
        await warm_up(c, vocab)
        t0 = time.perf_counter()
        end = t0 + args.duration
        steady: list[RequestRecord] = []
        long: list[RequestRecord] = []

        async def stream_client(k: int) -> None:
            r = random.Random(args.seed * 1000 + k)
            await asyncio.sleep(r.uniform(0, 1.0))
            while time.perf_counter() < end:
                req = BenchRequest(random_prompt(r, args.stream_prompt, vocab), args.stream_len)
                steady.append(await stream_request(c, req))

        async def bursts() -> None:
            for b in range(args.bursts):
                at = t0 + args.duration * (0.1 + 0.8 * b / max(args.bursts - 1, 1))
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                reqs = [BenchRequest(random_prompt(rng, args.long_len, vocab), args.long_out)
                        for _ in range(args.burst_size)]
                long.extend(await asyncio.gather(*(stream_request(c, r) for r in reqs)))

        await asyncio.gather(bursts(), *(stream_client(k) for k in range(args.streams)))
        wall = time.perf_counter() - t0
        stats_now = await c.call("stats")
    return steady, long, wall, stats_now


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-prompt", type=int, default=64)
    p.add_argument("--stream-len", type=int, default=128)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of steady traffic")
    p.add_argument("--long-len", type=int, default=4064)
    p.add_argument("--long-out", type=int, default=16)
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--burst-size", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512, help="the mixed instance's chunked-prefill budget")
    p.add_argument("--slo", default="tpot:150,ttft:30000", help="KEY:MS,... (ttft, tpot, e2el)")
    p.add_argument("--dtype", default="bfloat16")
    add_launch_args(p)
    args = p.parse_args(argv)
    slos = parse_slos(args.slo)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    results = {}
    for label, flags in CONFIGS.items():
        flags = [*flags, "--dtype", args.dtype, "--enforce-eager", "--max-num-batched-tokens", str(args.chunk),
                 *args.launch_args.split()]
        with deployment(model_dir, flags, label) as dep:
            results[label] = uvloop.run(run(dep.address, args, vocab))
        steady, long, wall, _ = results[label]
        print(f"{label}: {len(steady)} steady, {len(long)} long in {wall:.1f} s", flush=True)

    rows = []
    for label, (steady, long, wall, st) in results.items():
        done = [r for r in steady if r.ok and r.output_tokens == args.stream_len]
        tpot = stats([r.tpot for r in done if r.tpot is not None])
        gaps = [g for r in done for g in r.itls]
        gap = stats(gaps)
        p50 = sorted(gaps)[len(gaps) // 2] if gaps else float("nan")
        ttft = stats([r.ttft for r in long if r.ok])
        good = sum(meets_slos(r, slos) for r in steady + long)
        rows.append([label, len(done), tpot["mean"] * 1000, tpot["p99"] * 1000, p50 * 1000, gap["p99"] * 1000,
                     len(long), ttft["mean"] * 1000, good / wall, f"{good / max(len(steady) + len(long), 1):.0%}"])
    body = table(["configuration", "steady requests", "TPOT mean ms", "TPOT p99 ms", "gap p50 ms", "gap p99 ms",
                  "long prompts", "long TTFT mean ms", "goodput req/s", "met SLO"], rows)
    (mixed_label, m), (pd_label, d), *_ = results.items()
    def p99_gap(res) -> float:
        return stats([g for r in res[0] if r.ok for g in r.itls])["p99"]
    def p99_tpot(res) -> float:
        return stats([r.tpot for r in res[0] if r.ok and r.tpot is not None])["p99"]
    notes = [f"model {model_dir.name} ({args.dtype}), eager; two cores in both configurations",
             f"steady: {args.streams} clients back to back, prompts {args.stream_prompt} tokens, {args.stream_len} out, "
             f"for {args.duration:g} s; bursts: {args.bursts} × {args.burst_size} prompts of {args.long_len} tokens "
             f"({args.long_out} out); mixed chunked-prefill budget {args.chunk} tokens (PD: the same flag)",
             f"SLOs: {args.slo} (ms); goodput = requests that met them per second of the run",
             f"PD against mixed: p99 TPOT {p99_tpot(m) / p99_tpot(d):.1f}× lower, p99 inter-token gap "
             f"{p99_gap(m) / p99_gap(d):.1f}× lower"]
    report("W6 long-prompt interference (PD)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
