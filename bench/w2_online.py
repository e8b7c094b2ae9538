"""W2 online serving: W1's requests at Poisson rates through the HTTP shim, streamed.

    python -m bench.w2_online [--rates 1,2,4,8] [--requests 128] [--goodput ttft:2000,tpot:100]

Each rate sends the same requests (the same arrival pattern, scaled) to
``/v1/completions`` with ``stream: true`` (aiohttp), after clearing the prefix cache.
Per rate: throughput, TTFT/TPOT/ITL/E2EL mean, median and p99, and goodput under the
SLOs; then the highest rate at which ≥ 90% of requests meet them, and a plot of latency
against rate (``bench/w2_latency.png``). A rate's run is cut off after ``--max-seconds``:
requests not finished by then count as failed.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import sys
import time
from pathlib import Path

import aiohttp
import uvloop

from xllm.sdk import AsyncClient

from .common import (BENCH_DIR, BenchRequest, RequestRecord, add_launch_args, base_parser, offline_requests,
                     parse_slos, poisson_offsets, report, resolve_model, summarize, table, vocab_size)
from .drive import deployment, progress

GOOD_FRACTION = 0.9


async def http_request(session: aiohttp.ClientSession, url: str, model: str, req: BenchRequest,
                       timeout: float = 600.0, extra: dict | None = None) -> RequestRecord:
    """POST one streamed completion; one chunk per SSE event that carries a choice.

    ``extra``: more body fields, for a server that needs its own (llama.cpp's).
    """
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    rec = RequestRecord(len(req.prompt), time.perf_counter())
    usage = None
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if event.get("choices"):
                    rec.add(time.perf_counter(), 1)
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    if usage is not None and rec.chunk_tokens:  # a chunk may carry several tokens
        rec.chunk_tokens[-1] += usage - rec.output_tokens
    return rec


async def run_rate(url: str, model: str, requests: list[BenchRequest], rate: float, seed: int,
                   max_seconds: float, extra: dict | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` at Poisson ``rate``; records and the duration (first send → last token)."""
    offsets = poisson_offsets(len(requests), rate, seed)
    bar = progress(len(requests), f"rate {rate:g}/s")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, at: float) -> RequestRecord | None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            left = t0 + max_seconds - time.perf_counter()
            if left <= 0:
                return None  # never sent: the run is over
            rec = await http_request(session, url, model, req, left, extra)  # ends at the run's deadline
            bar.update(1)
            return rec

        sent = await asyncio.gather(*(one(r, at) for r, at in zip(requests, offsets)))
    bar.close()
    records = [r if r is not None else _unsent(req) for r, req in zip(sent, requests)]
    ends = [r.chunk_times[-1] for r in records if r.ok]
    return records, (max(ends) if ends else time.perf_counter()) - t0


def _unsent(req: BenchRequest) -> RequestRecord:
    rec = RequestRecord(len(req.prompt), 0.0)
    rec.error = "not sent before the time limit"
    return rec


async def reset_cache(address: str) -> None:
    """Clear the prefix cache, so each rate computes its prompts like the first one."""
    async with AsyncClient(address) as client:
        await client.call("reset_prefix_cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate_axis(ax, rates: list[float], title: str, unit: str) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set(title=title, xlabel="request rate (req/s)", ylabel=unit, xscale="log")
    ax.set_xticks(rates)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(rates: list[float], sums: list[dict], path) -> None:
    """Latency (mean and p99) and throughput against request rate, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, scale, unit in ((axes[0, 0], "ttft", 1000, "ms"), (axes[0, 1], "tpot", 1000, "ms"),
                                 (axes[1, 0], "e2el", 1, "s")):
        for stat, style in (("mean", "o-"), ("median", "s--"), ("p99", "^:")):
            ax.plot(rates, [s[key][stat] * scale for s in sums], style, label=stat)
        _rate_axis(ax, rates, key.upper(), unit)
        ax.legend()
    ax = axes[1, 1]
    ax.plot(rates, [s["output_throughput"] for s in sums], "o-", label="output tok/s")
    _rate_axis(ax, rates, "throughput", "output tok/s")
    ax2 = ax.twinx()
    ax2.plot(rates, [100 * s["good_fraction"] for s in sums], "s--", color="tab:red", label="% within SLO")
    ax2.set_ylabel("% of requests within SLO")
    ax2.set_ylim(0, 105)
    fig.suptitle("W2: xllm latency vs request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it (no machine's paths in RESULTS)."""
    try:
        return str(Path(path).resolve().relative_to(BENCH_DIR.parent))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--rates", default="1,2,4,8", help="request rates per second, light to overload")
    p.add_argument("--requests", type=int, default=128, help="requests per rate (W1's first N)")
    p.add_argument("--goodput", default="ttft:2000,tpot:100", help="SLOs in ms: ttft, tpot, e2el")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time limit of each rate's run")
    p.add_argument("--plot", default=str(BENCH_DIR / "w2_latency.png"), help="where the PNG goes")
    add_launch_args(p)
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    slos = parse_slos(args.goodput)
    model_dir = resolve_model(args.model)
    requests = offline_requests(args.requests, vocab_size(model_dir), args.seed)
    port = free_port()
    sums = []
    with deployment(model_dir, [*shlex.split(args.launch_args), "--http-port", str(port)]) as dep:
        url = f"http://127.0.0.1:{port}/v1/completions"
        name = model_dir.name
        warm = [BenchRequest(r.prompt[:64], 8) for r in requests[:4]]
        uvloop.run(run_rate(url, name, warm, 100.0, args.seed, 60))
        for rate in rates:
            uvloop.run(reset_cache(dep.address))
            records, wall = uvloop.run(run_rate(url, name, requests, rate, args.seed, args.max_seconds))
            s = summarize(records, wall, slos)
            sums.append(s)
            print(f"rate {rate:g}/s: {s['output_throughput']:.0f} output tok/s, "
                  f"{100 * s['good_fraction']:.0f}% within SLO, {s['failed']} failed", flush=True)
    plot(rates, sums, args.plot)

    thr = [[r, f"{s['completed']}/{s['requests']}", s["duration"], s["request_throughput"],
            s["output_throughput"], s["goodput"], f"{s['good_fraction']:.0%}"] for r, s in zip(rates, sums)]
    lat = [[r] + [s[k][st] * 1000 for k in ("ttft", "tpot", "itl", "e2el") for st in ("mean", "median", "p99")]
           for r, s in zip(rates, sums)]
    heads = [f"{k} {st}" for k in ("TTFT", "TPOT", "ITL", "E2EL") for st in ("mean", "median", "p99")]
    body = (table(["rate req/s", "completed", "seconds", "req/s", "output tok/s", "goodput req/s",
                   "within SLO"], thr) + "\n\nLatency (ms):\n\n" + table(["rate req/s", *heads], lat))
    ok = [r for r, s in zip(rates, sums) if s["good_fraction"] >= GOOD_FRACTION]
    notes = [f"model {name}; {args.requests} W1 requests (prompt 64–512, output 32–256, seed {args.seed}) per "
             f"rate, Poisson arrivals, streamed through /v1/completions; prefix cache cleared before each rate",
             f"SLOs {args.goodput} (ms); time limit {args.max_seconds:g} s per rate; plot {_shown(args.plot)}",
             f"highest rate with ≥ {GOOD_FRACTION:.0%} of requests within SLO: "
             + (f"{max(ok):g} req/s" if ok else "none of the rates tried")]
    report("W2 online serving", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

