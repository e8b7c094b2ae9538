"""W8 working set larger than the device pool: multi-turn conversations whose KV is 4× the
device pool, recomputed against loaded back from the host (and disk) tiers.

    python -m bench.w8_tiers [--conversations 32] [--turns 4] [--modes recompute,host,disk]
    python -m bench.w8_tiers --instances 2 --modes host --views tier-aware,device-only

Every conversation runs ``--turns`` turns one after another, a user's think time apart
(exponential, mean ``--think-time`` s; conversations start at random within the first mean
think time), all conversations at once: a first message of ``--first-len`` tokens, then
messages of ``--user-len``; each turn resends the whole history to ``/v1/completions``
(token ids, streamed, ``--output-len`` greedy tokens, EOS ignored) and the answer joins
the history. The device pool holds a quarter of the working set (the conversations' final
histories, over all instances), so a returning conversation's history is mostly gone from
the device by the time its next turn comes.

Modes: ``recompute`` (no tiers: a returning turn recomputes what the device let go);
``host`` (a host tier twice the working set: everything comes back from host memory);
``disk`` (a host tier of a quarter of the working set over a disk tier of twice it: most
comes back from disk through host memory). Views (with ``--instances`` > 1): the router's
``prefix_cache_aware`` with the measured tier weights (``tier-aware``) or ``1,1``
(``device-only``: host and disk hits count as misses).

Reported per run: TTFT of returning turns (turns 2+) and of first turns, output
throughput, blocks loaded back (host) and fetched (disk), and the fraction of the
load-back hidden behind compute: 1 − (time the workers waited for loads) / (the agent's
time loading), from ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shlex
import socket
import sys
import tempfile
from pathlib import Path

import uvloop

from xllm.sdk import AsyncClient

from .common import add_launch_args, base_parser, report, resolve_model, stats, table, vocab_size
from .drive import deployment, warm_up
from .w7_chat import chat

MODES = ("recompute", "host", "disk")
VIEWS = {"tier-aware": None, "device-only": "1,1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block_bytes(model_dir, dtype: str, block_size: int) -> int:
    from xllm.config import read_hf_config

    cfg = read_hf_config(model_dir)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * (
        4 if dtype == "float32" else 2)


def tier_flags(mode: str, working_set: int, block_bytes: int, instances: int) -> list[str]:
    """The tier flags of a mode, per instance, for a working set of ``working_set`` blocks."""
    gib = lambda blocks: repr(math.ceil(blocks / instances) * block_bytes / 2**30)  # noqa: E731
    if mode == "recompute":
        return []
    if mode == "host":
        return ["--kv-host-memory", gib(2 * working_set)]
    disk = tempfile.mkdtemp(prefix="xllm-bench-w8-disk-")
    return ["--kv-host-memory", gib(working_set // 4), "--kv-disk-dir", disk, "--kv-disk-size", gib(2 * working_set)]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each of the deployment's workers and KV agents has used."""
    out = {}
    for name, pid in pids.items():
        if "worker" in name or "kv-agent" in name:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def run(dep, port: int, model: str, users, output_len: int, think, vocab: int, label: str,
              start: asyncio.Barrier | None = None) -> dict:
    async with AsyncClient(dep.address) as client:
        await warm_up(client, vocab)
        while not await client.call("reset_prefix_cache"):  # the warm-up's last copies may still run
            await asyncio.sleep(0.05)
        if start is not None:
            await start.wait()  # side by side: every run's conversations start together
        before = await client.call("stats")
        cpu0, load0 = cpu_seconds(dep.pids), os.getloadavg()[0]
        records, wall = await chat(f"http://127.0.0.1:{port}/v1/completions", model, [], users, output_len,
                                   think, label)
        cpu1, load1 = cpu_seconds(dep.pids), os.getloadavg()[0]
        after = await client.call("stats")
    # NOTE: the machine is shared: how much CPU the engine got (and the load) says how far a
    # run's times are the engine's own
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    worker = sum(v for k, v in cpu.items() if "worker" in k) / wall
    agent = sum(v for k, v in cpu.items() if "kv-agent" in k) / wall
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "prefix_cache_queries", "prefix_cache_hits", "kv_host_loaded_blocks", "kv_disk_fetched_blocks",
        "kv_disk_failed_blocks", "kv_load_seconds", "kv_load_wait_seconds", "kv_fetch_seconds", "num_preemptions",
        "num_steps", "total_scheduled_tokens")}
    first = [conv[0] for conv in records]
    later = [r for conv in records for r in conv[1:]]
    load = delta["kv_load_seconds"]
    return {"ttft_later": stats([r.ttft for r in later]), "ttft_first": stats([r.ttft for r in first]),
            "throughput": sum(r.output_tokens for conv in records for r in conv) / wall, "wall": wall,
            "hit_rate": delta["prefix_cache_hits"] / max(delta["prefix_cache_queries"], 1),
            "hidden": 1.0 - delta["kv_load_wait_seconds"] / load if load else float("nan"),
            "worker_cores": worker, "agent_cores": agent, "load": (load0, load1), **delta}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-len", type=int, default=1024,
                   help="tokens of a conversation's first message (a long history: a document, a system prompt)")
    p.add_argument("--user-len", type=int, default=96, help="tokens of each later message")
    p.add_argument("--output-len", type=int, default=32, help="tokens of each answer")
    p.add_argument("--think-time", type=float, default=10.0, help="mean seconds between a conversation's turns")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-share", type=float, default=0.25, help="the device pool over the working set")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--views", default="tier-aware", help="router views to compare (with --instances > 1)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--side-by-side", action="store_true",
                   help="run every mode at once, each in its own deployment (on a shared machine, each then "
                        "meets the same load from other jobs; give each worker its share of the cores with "
                        "--launch-args '--threads-per-worker 1')")
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    rng = random.Random(args.seed)
    lo, hi = 100, vocab - 100
    users = [[[rng.randint(lo, hi) for _ in range(args.first_len if t == 0 else args.user_len)]
              for t in range(args.turns)] for _ in range(args.conversations)]
    think = [[rng.uniform(0, args.think_time)] + [rng.expovariate(1 / args.think_time) for _ in range(args.turns - 1)]
             for _ in range(args.conversations)]
    final = args.first_len + (args.turns - 1) * args.user_len + args.turns * args.output_len
    working_set = args.conversations * -(-final // args.block_size)
    device = math.ceil(args.pool_share * working_set / args.instances)
    block_bytes = _block_bytes(model_dir, args.dtype, args.block_size)

    configs = []  # (label, port, flags)
    for mode in args.modes.split(","):
        for view in args.views.split(","):
            port = _free_port()
            flags = ["--instances", str(args.instances), "--http-port", str(port), "--num-kv-blocks", str(device),
                     "--block-size", str(args.block_size), "--dtype", args.dtype,
                     *tier_flags(mode, working_set, block_bytes, args.instances), *shlex.split(args.launch_args)]
            if VIEWS[view] is not None:
                flags += ["--router-tier-weights", VIEWS[view]]
            configs.append((mode if args.instances == 1 else f"{mode}, {view}", port, flags))
    one = lambda dep, port, label, start=None: run(  # noqa: E731
        dep, port, model_dir.name, users, args.output_len, think, vocab, label, start)

    runs = {}
    if args.side_by_side:
        with contextlib.ExitStack() as stack:
            deps = [stack.enter_context(deployment(model_dir, flags, label)) for label, _, flags in configs]

            async def together():
                start = asyncio.Barrier(len(configs))
                return await asyncio.gather(*(one(dep, port, label, start)
                                              for dep, (label, port, _) in zip(deps, configs)))
            runs = dict(zip((label for label, _, _ in configs), uvloop.run(together())))
    for label, port, flags in configs if not args.side_by_side else []:
        with deployment(model_dir, flags, label) as dep:
            runs[label] = uvloop.run(one(dep, port, label))
    for label, r in runs.items():
        print(f"{label}: returning-turn TTFT mean {r['ttft_later']['mean'] * 1000:.0f} ms, "
              f"{r['throughput']:.1f} tok/s, hidden {r['hidden']:.1%}, preemptions {r['num_preemptions']}, "
              f"steps {r['num_steps']}, worker {r['worker_cores']:.2f} cores, agent {r['agent_cores']:.3f}, "
              f"load {r['load'][0]:.1f} -> {r['load'][1]:.1f}", flush=True)

    rows = [[label, r["ttft_later"]["mean"] * 1000, r["ttft_later"]["median"] * 1000, r["ttft_later"]["p99"] * 1000,
             r["ttft_first"]["mean"] * 1000, r["throughput"], f"{r['hit_rate']:.1%}", r["kv_host_loaded_blocks"],
             r["kv_disk_fetched_blocks"], "" if r["hidden"] != r["hidden"] else f"{r['hidden']:.1%}",
             r["num_preemptions"], f"{r['worker_cores']:.2f}", f"{r['agent_cores']:.3f}",
             f"{r['load'][0]:.1f} → {r['load'][1]:.1f}"]
            for label, r in runs.items()]
    body = table(["run", "returning TTFT mean ms", "median ms", "p99 ms", "first-turn TTFT mean ms",
                  "output tok/s", "prefix hit rate", "blocks from host", "blocks from disk",
                  "load-back hidden", "preemptions", "worker cores", "agent cores", "load average"], rows)
    notes = [f"model {model_dir.name} ({args.dtype}), {args.instances} instance(s) of 1 worker, device pool "
             f"{device} blocks of {args.block_size} tokens each: {args.pool_share:g} of the working set "
             f"({working_set} blocks: {args.conversations} final histories of {final} tokens)",
             f"{args.conversations} conversations × {args.turns} turns at once, {args.think_time:g} s mean think "
             f"time; first message {args.first_len} tokens, later ones {args.user_len}, answers {args.output_len} "
             "(greedy, EOS ignored), over HTTP with token-id prompts",
             "host: a host tier of twice the working set; disk: a host tier of a quarter of it over a disk tier "
             "of twice it; hidden = 1 − workers' wait for loads / the agent's load time",
             "worker / agent cores: the CPU time the instance's worker (its KV agent) used over the run's wall "
             "time; the machine is shared, so a run whose worker got less CPU ran on a busier machine "
             "(load average at the start → end of the run)"]
    if args.side_by_side:
        notes.append("side by side: the modes ran at the same time, each in its own deployment, their "
                     "conversations starting together (same workload, same machine load, the cores shared)")
    base = runs.get("recompute") or next((r for k, r in runs.items() if k.startswith("recompute")), None)
    if base is not None:
        for label, r in runs.items():
            if r is not base:
                notes.append(f"{label} against recompute: returning-turn TTFT {base['ttft_later']['mean'] / r['ttft_later']['mean']:.1f}× "
                             f"lower (mean), throughput {r['throughput'] / base['throughput']:.2f}×")
    report("W8 working set 4× the device pool (KV tiers)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
