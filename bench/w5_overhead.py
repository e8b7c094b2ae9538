"""W5 engine overhead: engine step vs bare forward; scheduler alone; async scheduling on/off.

    python -m bench.w5_overhead [--parts A,B,C] [--batches 1,8,64] [--launch-args="..."]

A: B requests (prompt 128, 128 output tokens, all at once) through a deployment; the
   step time is the wall time of the window where every request is decoding, over the
   steps in it (tokens one request received). The bare forward and the runner step are
   timed in this process at the window's middle context (``bench.bare_forward``), in
   rounds alternating with the engine runs while the idle deployment stays up.
B: the scheduler core with 1,000 running requests and no model (``bench.sched_only``).
C: a W1-like workload with async scheduling on and off (``--no-async-scheduling``).
"""

from __future__ import annotations

import os
import random
import shlex
import sys

import uvloop

from xllm.sdk import AsyncClient

from .common import (BenchRequest, add_launch_args, base_parser, offline_requests, random_prompt, report,
                     resolve_model, summarize, table, vocab_size)
from .drive import check, deployment, run_concurrent, warm_up

EDGE = 8  # tokens left out at each end of the decode window


def decode_step_time(records, edge: int = EDGE) -> tuple[float, int]:
    """Seconds per step while every request decodes, and the steps in that window.

    The window opens when the last request has its ``edge``-th token and closes when the
    first one has its ``edge``-th last; steps are the tokens request 0 got inside it.
    """
    opens = max(r.chunk_times[_token_index(r, edge)] for r in records)
    closes = min(r.chunk_times[_token_index(r, r.output_tokens - edge)] for r in records)
    steps = sum(n for t, n in zip(records[0].chunk_times, records[0].chunk_tokens) if opens < t <= closes)
    if steps < 4:
        raise RuntimeError("the decode window is too short: use more output tokens")
    return (closes - opens) / steps, steps


def _token_index(rec, k: int) -> int:
    """Index of the chunk that carried the ``k``-th output token (1-based)."""
    seen = 0
    for i, n in enumerate(rec.chunk_tokens):
        seen += n
        if seen >= k:
            return i
    return len(rec.chunk_tokens) - 1


async def engine_steps(address: str, batches: list[int], prompt_len: int, output_len: int, vocab: int,
                       seed: int) -> dict[int, tuple[float, int]]:
    """Per batch size: (seconds per decode step, steps measured)."""
    out = {}
    rng = random.Random(seed)
    async with AsyncClient(address) as client:
        await warm_up(client, vocab)
        for b in batches:
            reqs = [BenchRequest(random_prompt(rng, prompt_len, vocab), output_len) for _ in range(b)]
            records, _ = await run_concurrent(client, reqs, f"xllm batch {b}")
            check(records, reqs, f"batch {b}")
            out[b] = decode_step_time(records)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def part_a(args, model_dir, vocab) -> tuple[str, list[str]]:
    import statistics

    from .bare_forward import DecodeBench

    max_b = max(args.batches)
    launch = [*shlex.split(args.launch_args), "--max-num-seqs", str(max(max_b, 64))]
    graphs = "--enforce-eager" not in launch
    context = args.prompt_len + args.output_len // 2
    iters, warmup = 10, 2
    rows = []
    with deployment(model_dir, launch) as dep:  # idle (no CPU) while this process times the forwards
        for b in args.batches:
            bench = DecodeBench(model_dir, b, context, args.rounds * (iters + warmup), graphs)
            engine, inproc = [], []
            # CPU the processes beside the worker use while the engine runs (they sit idle
            # while this process times the forwards; the client is this process)
            others = {name: pid for name, pid in dep.pids.items() if not name.startswith("worker")}
            other_cpu = dict.fromkeys([*others, "client"], 0.0)
            for _ in range(args.rounds):  # alternate, so drift of the machine hits both alike
                before = {name: cpu_seconds(pid) for name, pid in others.items()}
                client0 = cpu_seconds(os.getpid())
                engine.append(uvloop.run(engine_steps(dep.address, [b], args.prompt_len, args.output_len,
                                                      vocab, args.seed))[b])
                other_cpu["client"] += cpu_seconds(os.getpid()) - client0
                for name, pid in others.items():
                    other_cpu[name] += cpu_seconds(pid) - before[name]
                inproc.append(bench.measure(iters, warmup))
            steps_run = args.rounds * (args.output_len + 1 + 9)  # prefill + decode, + about 9 warm-up steps
            del bench
            step = statistics.median(e[0] for e in engine)
            t = {k: statistics.median(m[k] for m in inproc) for k in inproc[0]}
            bare = t["graph"] if graphs else t["eager"]  # the forward the worker runs for decode steps
            rows.append([b, step * 1000, t["runner"] * 1000, t["graph"] * 1000, t["eager"] * 1000,
                         f"{(step - bare) / bare:+.0%}", f"{(t['runner'] - bare) / bare:+.0%}",
                         sum(e[1] for e in engine),
                         " / ".join(f"{other_cpu[k] / steps_run * 1000:.2f}" for k in ("scheduler", "frontend", "client"))])
    body = table(["batch", "engine step ms", "runner step ms", "graph forward ms", "eager forward ms",
                  "engine overhead", "runner overhead", "steps measured",
                  "CPU ms per step: scheduler / frontend / client"], rows)
    notes = [f"A: prompt {args.prompt_len}, {args.output_len} output tokens per request; the forwards and the "
             f"runner step timed in this process at context {context} (the middle of the engine's window); "
             f"{args.rounds} rounds alternating engine and in-process timings, medians",
             "overhead = (step − bare forward) / bare forward, where the bare forward is the "
             + ("compiled decode graph (what the worker runs)" if graphs else "eager forward (--enforce-eager)")
             + "; runner step = ModelRunner.execute (inputs from the plan + forward + sampling)",
             "CPU per step: user + system CPU of the processes beside the worker during the engine runs "
             "(/proc), over the steps those runs took; on 2 cores it is taken from the worker's two threads"]
    return body, notes


def part_b(args) -> tuple[str, list[str]]:
    from .sched_only import scheduler_step_times

    rows = []
    for mode in ("sync", "async"):
        r = scheduler_step_times(args.sched_requests, 128, args.sched_steps, mode)
        rows.append([mode] + [r[k][s] * 1000 for k in ("schedule", "update", "total")
                              for s in ("mean", "p99")] + [r["encode"]["mean"] * 1000])
    body = table(["mode", "schedule mean ms", "schedule p99 ms", "update mean ms", "update p99 ms",
                  "per step mean ms", "per step p99 ms", "encode plan mean ms"], rows)
    notes = [f"B: {args.sched_requests} running requests (prompt 128), {args.sched_steps} decode steps, "
             "fabricated StepResults, no model; per step = schedule() + update()"]
    return body, notes


def part_c(args, model_dir, vocab) -> tuple[str, list[str]]:
    reqs = offline_requests(args.c_requests, vocab, args.seed, (64, 512), (32, 256))
    rows = []
    for label, extra in (("async scheduling on", []), ("async scheduling off", ["--no-async-scheduling"])):
        with deployment(model_dir, [*shlex.split(args.launch_args), *extra], label) as dep:
            s = uvloop.run(_offline(dep.address, reqs, vocab, label))
        rows.append([label, s["output_tokens"], s["duration"], s["output_throughput"], s["tpot"]["mean"] * 1000])
    rows[1].append(f"{rows[1][3] / rows[0][3]:.2f}×")
    rows[0].append("1.00×")
    body = table(["xllm", "output tokens", "seconds", "output tok/s", "TPOT mean ms", "vs on"], rows)
    return body, [f"C: {args.c_requests} W1 requests (prompt 64–512, output 32–256, seed {args.seed}) at once"]


async def _offline(address, reqs, vocab, label) -> dict:
    async with AsyncClient(address) as client:
        await warm_up(client, vocab)
        records, wall = await run_concurrent(client, reqs, label)
    check(records, reqs, label)
    return summarize(records, wall)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--parts", default="A,B,C", help="which parts to run")
    p.add_argument("--batches", default="1,8,64", help="A: decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="A: prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="A: output tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="A: engine / in-process alternations per batch")
    p.add_argument("--sched-requests", type=int, default=1000, help="B: running requests")
    p.add_argument("--sched-steps", type=int, default=200, help="B: decode steps timed")
    p.add_argument("--c-requests", type=int, default=64, help="C: requests of the W1-like workload")
    add_launch_args(p)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    parts = set(args.parts.upper().split(","))
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    if "B" in parts:
        body, notes = part_b(args)
        report("W5 part B: scheduler time per step, no model", body, args, notes)
    if "A" in parts:
        body, notes = part_a(args, model_dir, vocab)
        report(f"W5 part A: engine step vs bare forward ({model_dir.name})", body, args, notes)
    if "C" in parts:
        body, notes = part_c(args, model_dir, vocab)
        report(f"W5 part C: async scheduling on vs off ({model_dir.name})", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
