"""W7 multi-turn chat through the router: conversations that share a system prompt, each
turn resending the whole history, over HTTP, on 2 instances; one run per router policy.

    python -m bench.w7_chat [--conversations 16] [--turns 6] [--policies prefix_cache_aware,round_robin,kv_cache_aware]

Every conversation starts with the same system prompt (``--system-len`` tokens) and runs
``--turns`` turns one after another, a user's think time apart (exponential, mean
``--think-time`` seconds; conversations start at random within the first mean think
time): the history so far plus a new user message
(``--user-len`` tokens) is sent to ``/v1/completions`` as token ids, streamed, for
``--output-len`` greedy tokens (EOS ignored); the answer's token ids
(``return_token_ids``) join the history. All conversations run at once. Each instance's
KV pool (``--num-kv-blocks``, default 60% of the workload's final history) holds about
half the conversations, so where a turn lands decides whether its history is cached.

Per policy: the prefix cache hit rate (cached prompt tokens / prompt tokens, all
instances, from ``stats``), TTFT mean / median / p99 over every turn (and over the later
turns alone), and output throughput.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shlex
import socket
import sys
import time

import aiohttp
import uvloop

from xllm.sdk import AsyncClient

from .common import RequestRecord, add_launch_args, base_parser, report, resolve_model, stats, table, vocab_size
from .drive import deployment, progress, warm_up

POLICIES = ("prefix_cache_aware", "round_robin", "kv_cache_aware")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def turn(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
               max_tokens: int) -> tuple[RequestRecord, list[int]]:
    """One streamed turn; its record and the answer's token ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    rec = RequestRecord(len(prompt), time.perf_counter())
    ids: list[int] = []
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=600)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec, ids
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec.error = event["error"]["message"]
                for choice in event.get("choices", []):
                    if choice.get("token_ids"):
                        ids += choice["token_ids"]
                        rec.add(time.perf_counter(), len(choice["token_ids"]))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec, ids


async def chat(url: str, model: str, system: list[int], users: list[list[list[int]]],
               output_len: int, think: list[list[float]], label: str) -> tuple[list[list[RequestRecord]], float]:
    """Every conversation at once, its turns in order; records per turn, and the wall time."""
    bar = progress(sum(map(len, users)), label)
    async with aiohttp.ClientSession() as session:
        async def conversation(messages: list[list[int]], pauses: list[float]) -> list[RequestRecord]:
            history, records = list(system), []
            for user, pause in zip(messages, pauses):
                await asyncio.sleep(pause)
                history += user
                rec, answer = await turn(session, url, model, history, output_len)
                if not rec.ok or len(answer) != output_len:
                    raise RuntimeError(f"{label}: a turn failed: {rec.error or f'{len(answer)} tokens'}")
                history += answer
                records.append(rec)
                bar.update(1)
            return records

        t0 = time.perf_counter()
        out = await asyncio.gather(*(conversation(m, p) for m, p in zip(users, think)))
        wall = time.perf_counter() - t0
    bar.close()
    return list(out), wall


async def run(dep, port: int, model: str, system, users, output_len: int, think, vocab: int, label: str) -> dict:
    async with AsyncClient(dep.address) as client:
        await warm_up(client, vocab)
        await client.call("reset_prefix_cache")
        before = await client.call("stats")
        records, wall = await chat(f"http://127.0.0.1:{port}/v1/completions", model, system, users,
                                   output_len, think, label)
        after = await client.call("stats")
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    every = [r for conv in records for r in conv]
    later = [r for conv in records for r in conv[1:]]
    per_instance = {i: s["num_finished"] - before["instances"].get(i, {}).get("num_finished", 0)
                    for i, s in after["instances"].items()}
    return {"hit_rate": hits / queries if queries else 0.0,
            "ttft": stats([r.ttft for r in every]), "later_ttft": stats([r.ttft for r in later]),
            "throughput": sum(r.output_tokens for r in every) / wall, "wall": wall, "placed": per_instance}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=64, help="tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=96, help="tokens of each user message")
    p.add_argument("--output-len", type=int, default=32, help="tokens of each answer")
    p.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a conversation's turns")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=0,
                   help="KV blocks per instance (0: 60%% of the workload's final history)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--dtype", default="auto", help="--dtype of the instances (auto: bfloat16 where the CPU has native bf16, else float32)")
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    rng = random.Random(args.seed)
    lo, hi = 3, vocab - 1
    system = [rng.randint(lo, hi) for _ in range(args.system_len)]
    users = [[[rng.randint(lo, hi) for _ in range(args.user_len)] for _ in range(args.turns)]
             for _ in range(args.conversations)]
    think = [[rng.uniform(0, args.think_time)] + [rng.expovariate(1 / args.think_time) if args.think_time else 0.0
                                                  for _ in range(args.turns - 1)] for _ in range(args.conversations)]
    final = args.system_len + args.turns * (args.user_len + args.output_len)
    blocks = args.num_kv_blocks or math.ceil(0.6 * args.conversations * final / args.block_size)

    runs = {}
    for policy in args.policies.split(","):
        port = _free_port()
        flags = ["--instances", str(args.instances), "--router-policy", policy, "--http-port", str(port),
                 "--num-kv-blocks", str(blocks), "--block-size", str(args.block_size), "--dtype", args.dtype,
                 *shlex.split(args.launch_args)]
        with deployment(model_dir, flags, policy) as dep:
            runs[policy] = uvloop.run(run(dep, port, model_dir.name, system, users, args.output_len, think,
                                          vocab, policy))
        r = runs[policy]
        print(f"{policy}: hit rate {r['hit_rate']:.1%}, mean TTFT {r['ttft']['mean'] * 1000:.0f} ms, "
              f"{r['throughput']:.0f} tok/s, placed {r['placed']}", flush=True)

    rows = [[policy, f"{r['hit_rate']:.1%}", r["ttft"]["mean"] * 1000, r["ttft"]["median"] * 1000,
             r["ttft"]["p99"] * 1000, r["later_ttft"]["mean"] * 1000, r["throughput"],
             " / ".join(str(v) for _, v in sorted(r["placed"].items()))]
            for policy, r in runs.items()]
    body = table(["policy", "prefix hit rate", "mean TTFT ms", "median TTFT ms", "p99 TTFT ms",
                  "mean TTFT ms, turns 2+", "output tok/s", "turns per instance"], rows)
    notes = [f"model {model_dir.name} ({args.dtype}), {args.instances} instances of 1 worker, "
             f"{blocks} KV blocks of {args.block_size} tokens each",
             f"{args.conversations} conversations × {args.turns} turns, all conversations at once, turns "
             f"{args.think_time:g} s of think time apart (exponential; the same pauses for every policy); "
             f"shared system prompt {args.system_len} tokens, user messages {args.user_len}, answers "
             f"{args.output_len} (greedy, EOS ignored), over HTTP with token-id prompts",
             "hit rate = cached prompt tokens / prompt tokens over all turns (all instances)"]
    if "prefix_cache_aware" in runs and "round_robin" in runs:
        pa, rr = runs["prefix_cache_aware"], runs["round_robin"]
        notes.append(f"prefix_cache_aware against round_robin: hit rate {pa['hit_rate'] / max(rr['hit_rate'], 1e-9):.1f}×, "
                     f"mean TTFT {rr['ttft']['mean'] / pa['ttft']['mean']:.1f}× lower")
    report("W7 multi-turn chat (router)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
