"""What W7's hit rates can be, from a model of its caches alone (no engine, seconds to run).

    python -m bench.w7_bound [--instances 2,3,4] [--blocks 150,210,300,420,1000]

The W7 workload (``bench.w7_chat``'s parameters and think-time model; each turn's service
taken as ``--service-time`` seconds) replayed against one LRU cache of chained block
hashes per instance, as the engine's prefix cache works: a turn hits the longest run of
its prompt's blocks that its instance holds, then its prompt and answer are the
instance's most recent blocks, the deepest block oldest (the engine evicts a freed
request's tail first). Two placements:

- ``sticky``: conversation c always on instance c mod N, which is what a prefix-aware
  router that keeps balance does at best;
- ``round_robin``: turn k of the whole trace on instance k mod N.

It answers one question the engine runs cannot: how far apart the two policies' hit
rates can be for a given number of instances, whatever the router does. With round robin
a turn lands on the instance that served the conversation's previous turn with
probability 1/N, so its hit rate stays near 1/N of sticky's plus what survives elsewhere.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import OrderedDict

from .common import RESULTS, report, table


def schedule(conversations: int, turns: int, think: float, service: float, seed: int) -> list[tuple[float, int]]:
    """(arrival time, conversation) of every turn, in time order."""
    rng = random.Random(seed)
    events = []
    for c in range(conversations):
        t = rng.uniform(0, think)
        for _ in range(turns):
            events.append((t, c))
            t += rng.expovariate(1 / think) + service
    return sorted(events)


def hit_rate(placement: str, instances: int, blocks: int, args, seed: int) -> float:
    """Cached prompt tokens / prompt tokens over the whole trace."""
    caches = [OrderedDict() for _ in range(instances)]
    length = {c: args.system_len for c in range(args.conversations)}  # history tokens so far
    shared = args.system_len // args.block_size  # blocks every conversation has in common
    hits = total = 0
    for k, (_, c) in enumerate(schedule(args.conversations, args.turns, args.think_time,
                                        args.service_time, seed)):
        prompt = length[c] + args.user_len
        where = caches[c % instances if placement == "sticky" else k % instances]
        keys = [(-1 if j < shared else c, j) for j in range(prompt // args.block_size)]
        hit = 0
        while hit < len(keys) and keys[hit] in where:
            hit += 1
        hits, total = hits + hit * args.block_size, total + prompt
        length[c] = prompt + args.output_len
        for j in reversed(range(length[c] // args.block_size)):  # the root most recent
            key = (-1 if j < shared else c, j)
            where[key] = True
            where.move_to_end(key)
        while len(where) > blocks:
            where.popitem(last=False)
    return hits / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", default="2,3,4")
    p.add_argument("--blocks", default="150,210,300,420,1000", help="KV blocks per instance")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=64)
    p.add_argument("--user-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--think-time", type=float, default=1.0)
    p.add_argument("--service-time", type=float, default=0.3, help="seconds one turn takes")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=8, help="traces averaged per row")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file sections are appended to")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to the results")
    args = p.parse_args(argv)
    rows = []
    for n in map(int, args.instances.split(",")):
        for blocks in map(int, args.blocks.split(",")):
            sticky = sum(hit_rate("sticky", n, blocks, args, s) for s in range(args.seeds)) / args.seeds
            rr = sum(hit_rate("round_robin", n, blocks, args, s) for s in range(args.seeds)) / args.seeds
            rows.append([n, blocks, f"{sticky:.1%}", f"{rr:.1%}", f"{sticky / rr:.2f}×"])
            print(*rows[-1], flush=True)
    notes = [f"{args.conversations} conversations × {args.turns} turns, system prompt {args.system_len} "
             f"tokens, user {args.user_len}, answer {args.output_len}, think time {args.think_time:g} s "
             f"(exponential), service {args.service_time:g} s per turn, blocks of {args.block_size}; "
             f"{args.seeds} traces per row",
             "a model of the caches (LRU per instance, tail-first), not an engine run"]
    report("W7 hit-rate bound (cache model)", table(
        ["instances", "KV blocks per instance", "sticky hit rate", "round_robin hit rate", "ratio"], rows),
        args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
