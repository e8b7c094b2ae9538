"""xllm against llama.cpp's ``llama-server`` on one checkpoint, in one run, over one HTTP client.

    python -m bench.vs_llamacpp [--model preset:llama-110m] [--workloads w3,w1,w2]
        [--slots 16,32] [--gguf FILE] [--gguf-type bf16] [--launch-args="..."]

Both servers get the same requests through ``bench.w2_online.http_request`` (streamed
``/v1/completions`` with token-id prompts, greedy, EOS ignored). llama.cpp is built from
source and the checkpoint converted to GGUF by ``bench.llamacpp``; both use 2 threads
(this machine's cores) and the weights of ``--gguf-type``: ``bf16`` (xllm ``--dtype
bfloat16``), ``f32`` (``--dtype float32``) or ``q8_0``, where both serve the same Q8_0 file
(xllm with ``--quantization q8_0``, which keeps the file's blocks; activations in the
dtype ``--dtype auto`` picks). The bounds count the bytes and the GEMM rate of that type
(``WEIGHTS``: 2, 4 and 34/32 bytes per weight).

- W3 single stream: a prompt of 32 random tokens (new each round), 128 output tokens,
  the two servers and the read-bandwidth measurement alternating; medians. The bandwidth
  bound is ``bench.bounds``: weight bytes a decode step reads over the read bandwidth.
- W1 batched: W1's requests (prompt 64–512, output 32–256) sent by ``--clients`` closed-
  loop clients; llama.cpp once per slot count in ``--slots`` (its best is the ratio's
  denominator); xllm before and after it. The compute bound is the workload's FLOPs over
  the GEMM rate measured in the run in the serving dtype (``bench.bounds``).
- W2 online: the same requests at Poisson rates; llama.cpp at its best W1 slot count.
"""

from __future__ import annotations

import asyncio
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
import uvloop

from xllm.sdk import AsyncClient

from .bounds import Shape, matmul_rate, read_bandwidth, workload_flops
from .common import (BenchRequest, add_launch_args, base_parser, offline_requests, parse_slos, random_prompt,
                     report, resolve_model, summarize, table, vocab_size)
from .drive import deployment, progress
from .llamacpp import LlamaServer, to_gguf
from .w2_online import free_port, http_request, reset_cache, run_rate

LLAMA_EXTRA = {"cache_prompt": False}  # every request computes its prompt, as xllm's do after a cache reset


@dataclass(frozen=True)
class Server:
    """Where one system takes completions: its URL, the model name it serves, extra body fields."""

    url: str
    model: str
    extra: dict | None = None


async def closed_loop(server: Server, requests: list[BenchRequest], clients: int,
                      label: str) -> tuple[list, float]:
    """``clients`` clients, each sending its next request when the last one ended."""
    queue = list(enumerate(requests))[::-1]
    records: list = [None] * len(requests)
    bar = progress(len(requests), label)
    # NOTE: a new connection per request, for both servers: llama-server closes a kept-alive
    # connection after a few requests, and a pooled connection it has just closed fails the
    # next POST with "Can not write request body" (seen at 32 clients)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        async def client() -> None:
            while queue:
                i, req = queue.pop()
                records[i] = await http_request(session, server.url, server.model, req, extra=server.extra)
                bar.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    bar.close()
    return records, wall


def checked(records: list, requests: list[BenchRequest], label: str) -> None:
    """A failed or short request makes the comparison void: stop with what went wrong."""
    for rec, req in zip(records, requests):
        if not rec.ok or rec.output_tokens != req.max_tokens:
            raise RuntimeError(f"{label}: asked for {req.max_tokens} tokens, got {rec.output_tokens} "
                               f"{rec.error or ''}")


async def one(server: Server, req: BenchRequest):
    async with aiohttp.ClientSession() as session:
        return await http_request(session, server.url, server.model, req, extra=server.extra)


@dataclass(frozen=True)
class Weights:
    """A ``--gguf-type``: how xllm serves it, the bytes a weight takes, the name in the notes."""

    name: str
    xllm_dtype: str  # xllm's --dtype
    bytes_per_weight: float

    def compute_dtype(self) -> str:
        """The dtype xllm's matmuls run in (``auto``: what ``--dtype auto`` picks for a 16-bit file)."""
        if self.xllm_dtype != "auto":
            return self.xllm_dtype
        from xllm.platform import serving_dtype

        return serving_dtype({"dtype": "bfloat16"})


WEIGHTS = {"bf16": Weights("bf16", "bfloat16", 2.0), "f32": Weights("f32", "float32", 4.0),
           "q8_0": Weights("Q8_0", "auto", 34 / 32)}


def warm(server: Server) -> None:
    """A few short requests, so first-step costs are paid before anything is timed."""
    reqs = [BenchRequest(list(range(200 + i, 264 + i)), 8) for i in range(4)]
    records, _ = uvloop.run(closed_loop(server, reqs, 4, "warm-up"))
    checked(records, reqs, "warm-up")


def llama(server: LlamaServer) -> Server:
    return Server(server.url, "llama.cpp", LLAMA_EXTRA)


def w3(args, xllm: Server, address: str, gguf: Path, shape: Shape, vocab: int) -> None:
    q8 = args.gguf_type == "q8_0"
    weights = WEIGHTS[args.gguf_type]
    rng = random.Random(args.seed)
    runs = {"xllm": [], "llama.cpp": []}
    bws = []
    with LlamaServer(gguf, slots=1) as server:
        peer = llama(server)
        warm(peer)
        for _ in range(args.repeats):
            req = BenchRequest(random_prompt(rng, 32, vocab), 128)
            for name, target in (("xllm", xllm), ("llama.cpp", peer)):
                rec = uvloop.run(one(target, req))
                checked([rec], [req], name)
                runs[name].append((rec.ttft, rec.tpot, rec.e2el))
            bws.append(read_bandwidth())
    bw = statistics.median(bws)
    step_bytes = shape.decode_bytes(weights.bytes_per_weight)
    bound = bw / step_bytes  # tokens/s
    rows, tps = [], {}
    for name, r in runs.items():
        ttft, tpot, e2e = (statistics.median(x) for x in zip(*r))
        tps[name] = 1 / tpot
        rows.append([name, ttft * 1000, tpot * 1000, 1 / tpot, 128 / e2e, f"{100 / tpot / bound:.0f}%"])
    rows.append(["bandwidth bound", "-", 1000 / bound, bound, "-", "100%"])
    body = table(["system", "TTFT ms", "TPOT ms", "decode tok/s", "tok/s end to end", "of the bound"], rows)
    report("W3 single stream, xllm and llama.cpp", body, args, [
        f"model {args.model_name}; llama.cpp on {gguf.name}; prompt 32 random tokens (new each round), "
        f"128 output tokens; medians of {args.repeats} rounds (xllm, llama.cpp, bandwidth alternating); "
        "2 threads each; streamed /v1/completions",
        f"read bandwidth {bw / 1e9:.1f} GB/s (sum of a 1 GiB tensor); a decode step reads "
        f"{step_bytes / 1e6:.0f} MB of {weights.name} weights"
        + (f"; xllm serves {gguf.name} too (--quantization q8_0)" if q8 else ""),
        f"xllm / llama.cpp (decode tok/s): {tps['xllm'] / tps['llama.cpp']:.2f}×"])


def w1(args, xllm: Server, address: str, gguf: Path, shape: Shape, vocab: int) -> int:
    """Batched runs; returns llama.cpp's best slot count."""
    requests = offline_requests(args.requests, vocab, args.seed)
    flops = workload_flops(shape, requests)
    dtype = WEIGHTS[args.gguf_type].compute_dtype()
    rate = matmul_rate(dtype=getattr(torch, dtype))
    bound_s = flops / rate
    results = []  # (system, slots, output tokens, seconds)

    def timed(label: str, target: Server, slots) -> None:
        records, wall = uvloop.run(closed_loop(target, requests, args.clients, label))
        checked(records, requests, label)
        results.append((label, slots, sum(r.output_tokens for r in records), wall))
        print(f"{label}: {results[-1][2] / wall:.1f} output tok/s", flush=True)

    uvloop.run(reset_cache(address))
    timed("xllm (first)", xllm, "-")
    for slots in map(int, args.slots.split(",")):
        with LlamaServer(gguf, slots=slots) as server:
            warm(llama(server))
            timed(f"llama.cpp, {slots} slots", llama(server), slots)
    uvloop.run(reset_cache(address))
    timed("xllm (last)", xllm, "-")
    best = max((r for r in results if r[1] != "-"), key=lambda r: r[2] / r[3])
    rows = [[name, tokens, wall, tokens / wall, f"{tokens / wall / (best[2] / best[3]):.2f}×",
             f"{100 * bound_s / wall:.0f}%"] for name, _, tokens, wall in results]
    body = table(["system", "output tokens", "seconds", "output tok/s", "vs llama.cpp at its best",
                  "of the compute bound"], rows)
    report("W1 batched, xllm and llama.cpp", body, args, [
        f"model {args.model_name}; llama.cpp on {gguf.name}; {len(requests)} W1 requests (prompt 64–512, "
        f"output 32–256, seed {args.seed}) from {args.clients} closed-loop clients over streamed "
        "/v1/completions; 2 threads each; xllm before and after llama.cpp (prefix cache cleared)",
        f"compute bound {bound_s:.1f} s: the workload's {flops / 1e12:.2f} TFLOP (bench.bounds) over "
        f"{rate / 1e9:.0f} GFLOP/s (a 2048³ {dtype} GEMM, measured in this run)"])
    return best[1]


def w2(args, xllm: Server, address: str, gguf: Path, shape: Shape, vocab: int, slots: int) -> None:
    requests = offline_requests(args.w2_requests, vocab, args.seed)
    slos = parse_slos(args.goodput)
    rows = []
    with LlamaServer(gguf, slots=slots) as server:
        peer = llama(server)
        warm(peer)
        for rate in (float(r) for r in args.rates.split(",")):
            for name, target in (("xllm", xllm), ("llama.cpp", peer)):
                if name == "xllm":
                    uvloop.run(reset_cache(address))
                records, wall = uvloop.run(run_rate(target.url, target.model, requests, rate, args.seed,
                                                    args.max_seconds, target.extra))
                s = summarize(records, wall, slos)
                rows.append([rate, name, f"{s['completed']}/{s['requests']}", s["output_throughput"],
                             s["ttft"]["mean"] * 1000, s["ttft"]["p99"] * 1000, s["tpot"]["mean"] * 1000,
                             s["tpot"]["p99"] * 1000, f"{s['good_fraction']:.0%}"])
                print(f"rate {rate:g}, {name}: {s['output_throughput']:.0f} tok/s", flush=True)
    body = table(["rate req/s", "system", "completed", "output tok/s", "TTFT mean ms", "TTFT p99 ms",
                  "TPOT mean ms", "TPOT p99 ms", "within SLO"], rows)
    report("W2 online, xllm and llama.cpp", body, args, [
        f"model {args.model_name}; llama.cpp on {gguf.name} with {slots} slots; {len(requests)} W1 requests "
        f"per rate, Poisson arrivals (the same for both), streamed /v1/completions; SLOs {args.goodput} ms; "
        f"time limit {args.max_seconds:g} s per run"])


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--workloads", default="w3,w1,w2", help="comma list of w3, w1, w2")
    p.add_argument("--gguf", default="", help="llama.cpp's file (default: the checkpoint converted to --gguf-type)")
    p.add_argument("--gguf-type", default="bf16", choices=sorted(WEIGHTS), help="the weights both serve")
    p.add_argument("--repeats", type=int, default=5, help="W3 rounds")
    p.add_argument("--requests", type=int, default=96, help="W1 requests")
    p.add_argument("--clients", type=int, default=32, help="W1 concurrent clients")
    p.add_argument("--slots", default="16,32", help="llama.cpp slot counts tried on W1")
    p.add_argument("--rates", default="1,2,4", help="W2 request rates per second")
    p.add_argument("--w2-requests", type=int, default=64, help="W2 requests per rate")
    p.add_argument("--goodput", default="ttft:2000,tpot:100", help="W2 SLOs in ms")
    p.add_argument("--max-seconds", type=float, default=300.0, help="W2 time limit per run")
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    args.model_name = model_dir.name
    shape, vocab = Shape.of(model_dir), vocab_size(model_dir)
    gguf = Path(args.gguf) if args.gguf else to_gguf(model_dir, args.gguf_type)
    workloads = args.workloads.split(",")
    port = free_port()
    # NOTE: with Q8_0 xllm serves llama.cpp's file itself, its blocks kept as they are
    same_file = ["--quantization", "q8_0"] if args.gguf_type == "q8_0" else []
    launch = ["--dtype", WEIGHTS[args.gguf_type].xllm_dtype, *same_file, *shlex.split(args.launch_args), "--http-port", str(port)]
    with deployment(gguf if same_file else model_dir, launch) as dep:
        xllm = Server(f"http://127.0.0.1:{port}/v1/completions", served_name(dep.address))
        warm(xllm)
        slots = max(map(int, args.slots.split(",")))
        if "w3" in workloads:
            w3(args, xllm, dep.address, gguf, shape, vocab)
        if "w1" in workloads:
            slots = w1(args, xllm, dep.address, gguf, shape, vocab)
        if "w2" in workloads:
            w2(args, xllm, dep.address, gguf, shape, vocab, slots)
    return 0


def served_name(address: str) -> str:
    """The model name the deployment answers to (what a client puts in ``model``)."""
    async def ask() -> str:
        async with AsyncClient(address) as client:
            await client.wait_ready(60)
            return (await client.call("model_info"))["name"]

    return uvloop.run(ask())


if __name__ == "__main__":
    sys.exit(main())
