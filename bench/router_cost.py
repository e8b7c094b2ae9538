"""The router's own cost: one placement decision against a synthetic registry.

    python -m bench.router_cost [--instances 1,100,1000] [--decisions 20000]

A registry of N instances, each with a load report (random waiting/running/free
blocks), and a prefix index as a busy deployment would have it: every instance holds
the shared system prompt (4 blocks) and the histories of 20 conversations of its own
(up to 64 blocks each). Each decision is a request of a random conversation's next
turn (its history plus one new block), or with probability 0.2 a new conversation
(the system prompt plus new blocks). Per policy: the time of ``policy.choose`` plus the
bookkeeping of a placement (``registry.routed``), mean, median, p99 and max, in µs.
No process, no socket: the bus adds its round trip (bench W5) to every request anyway.
"""

from __future__ import annotations

import random
import sys
import time

from xllm.config import SloConfig
from xllm.perf_model import ServiceModel
from xllm.protocol import InstanceLoad, InstanceProfile, SamplingParams, TokenizedRequest
from xllm.router.policies import POLICIES, make_policy
from xllm.router.prefix_index import PrefixIndex
from xllm.router.registry import InstanceState, Registry

from .common import base_parser, report, stats, table

SYSTEM_BLOCKS = 4
CONVERSATIONS_PER_INSTANCE = 20
MAX_HISTORY_BLOCKS = 64
# slo_aware: every instance has llama-110m's shape of profile on this machine (bench/sim/profile.json's
# order of magnitude), and targets most of them meet
PROFILE = InstanceProfile((0.06, 2.2e-3, 4e-7), (0.027, 4.5e-3, 1e-5))
SLO = SloConfig(ttft_s=2.0, tpot_s=0.5)


def build(n: int, rng: random.Random) -> tuple[Registry, PrefixIndex, list[list[int]]]:
    """A registry of ``n`` loaded instances, the index of what they hold, and the
    conversations (their block hashes)."""
    registry, index = Registry(), PrefixIndex()
    system = [rng.getrandbits(63) for _ in range(SYSTEM_BLOCKS)]
    conversations = []
    for k in range(n):
        iid = f"h{k}-i0"
        inst = InstanceState(iid, f"tcp://10.0.{k // 250}.{k % 250}:7300", "x", num_blocks=4096,
                             block_size=16, max_num_seqs=64)
        inst.model = ServiceModel(PROFILE)
        registry.add(inst)
        registry.report(InstanceLoad(iid, "x", rng.randint(0, 20), rng.randint(0, 64),
                                     rng.randint(0, 4096), 4096, 0.05, 0.01))
        held = list(system)
        for _ in range(CONVERSATIONS_PER_INSTANCE):
            conv = system + [rng.getrandbits(63) for _ in range(rng.randint(1, MAX_HISTORY_BLOCKS - SYSTEM_BLOCKS))]
            conversations.append(conv)
            held += conv[SYSTEM_BLOCKS:]
        index.stored(iid, held)
    return registry, index, conversations


def requests(conversations: list[list[int]], count: int, rng: random.Random) -> list[TokenizedRequest]:
    out = []
    for n in range(count):
        if rng.random() < 0.2:
            hashes = conversations[0][:SYSTEM_BLOCKS] + [rng.getrandbits(63) for _ in range(rng.randint(1, 8))]
        else:
            hashes = rng.choice(conversations) + [rng.getrandbits(63)]
        out.append(TokenizedRequest(f"r{n}", [1] * (16 * len(hashes)), SamplingParams(), [], 0.0,
                                    block_hashes=hashes, block_size=16))
    return out


def measure(policy_name: str, n: int, decisions: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    registry, index, conversations = build(n, rng)
    policy = make_policy(policy_name, index, SLO)
    reqs = requests(conversations, decisions, rng)
    times = []
    clock = time.perf_counter_ns
    for req in reqs:
        t0 = clock()
        inst = policy.choose(req, registry)
        registry.routed(inst, len(req.block_hashes))
        times.append((clock() - t0) / 1000)
        if len(times) % 64 == 0:  # load reports arrive and reset what was sent since
            for i in rng.sample(list(registry.instances.values()), min(8, n)):
                registry.report(InstanceLoad(i.id, "x", rng.randint(0, 20), rng.randint(0, 64),
                                             rng.randint(0, 4096), 4096, 0.05, 0.01))
    return times


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--instances", default="1,100,1000", help="registry sizes, comma-separated")
    p.add_argument("--decisions", type=int, default=20000, help="decisions timed per size and policy")
    args = p.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.instances.split(",")]:
        for name in POLICIES:
            t = measure(name, n, args.decisions, args.seed)
            s = stats(t)
            rows.append([n, name, s["mean"], s["median"], s["p99"], max(t)])
            print(f"{n} instances, {name}: p99 {s['p99']:.1f} µs", flush=True)
    body = table(["instances", "policy", "mean µs", "median µs", "p99 µs", "max µs"], rows)
    notes = [f"{args.decisions} decisions per row; each instance holds a shared {SYSTEM_BLOCKS}-block system "
             f"prompt and {CONVERSATIONS_PER_INSTANCE} conversations of up to {MAX_HISTORY_BLOCKS} blocks; "
             "80% of requests continue a conversation, 20% start one",
             "time = policy.choose + registry.routed, in one process (no socket)"]
    report("Router decision time (synthetic registry)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
