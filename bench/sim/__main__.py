"""The router at 10, 100 and 1,000 instances, simulated: every policy on every trace.

    python -m bench.sim [--sizes 10,100,1000] [--requests 100000] [--traces shift,bursty,chat]

Each size runs ``--requests`` requests (scaled down for the small sizes: ``--per-instance``
at most each) through the router's real policies, registry, prefix index and adaptive PD
controller (``bench.sim.engine``), on instances whose step times come from a measured
profile (``--profile``, written by ``python -m bench.sim.measure``). The arrival rate is
``--load`` times an estimate of what the instances can serve, so every size sees the same
pressure. Traces (``bench.sim.traces``):

- ``shift``: Poisson arrivals; the mix alternates prompt-heavy (prompts 384-1,000 tokens,
  outputs 8-48) and output-heavy (prompts 32-128, outputs 128-320) in four phases;
- ``bursty``: the same with gamma gaps of shape 0.25 (bursts, the same mean rate);
- ``chat``: shared-prefix conversations (16 system prompts of 512 tokens, 4 turns each
  resending the history).

Rows: the four policies on mixed instances, and ``slo_aware`` on a PD split (half and
half) with ``--adaptive-pd``. Columns: load balance (busiest instance's busy time over the
mean), prefix hit rate (prompt tokens found cached where they were computed), TTFT p50/p99,
TPOT p50, goodput (requests meeting both SLOs a second, and their share), the router's CPU
per decision (mean and p99, this process), role changes, and the simulator's own wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import msgspec

from xllm.config import AdaptivePDConfig, SloConfig
from xllm.perf_model import ServiceModel
from xllm.protocol import InstanceProfile

from .engine import SimConfig, SimResult, Simulation
from .traces import Chat, Phase, SimRequest, chat, describe, phased

PROFILE = Path(__file__).parent / "profiles" / "llama-110m-fp32-1thread.json"
POLICIES = ("round_robin", "kv_cache_aware", "prefix_cache_aware", "slo_aware")
A = ((384, 1000), (8, 48))  # prompt-heavy: prompt and output ranges
B = ((32, 128), (128, 320))  # output-heavy
CHAT = Chat(0, turns=4, families=16, system=512, user=(32, 128), output=(32, 160), think=20.0, max_prompt=2000)


def service_s(model: ServiceModel, prompt: float, output: float, batch: int) -> float:
    """Instance-seconds one request takes on a mixed instance decoding ``batch`` at a time:
    its prefill alone plus its share of the decode steps it is in."""
    step = model.decode_step_s(batch, int(batch * (prompt + output / 2)))
    return model.prefill_s(int(prompt)) + output * step / batch


def capacity(model: ServiceModel, batch: int) -> float:
    """Requests a second one instance serves of an even mix of A and B (a rough bound)."""
    mean = lambda r: (r[0] + r[1]) / 2  # noqa: E731
    per = (service_s(model, mean(A[0]), mean(A[1]), batch) + service_s(model, mean(B[0]), mean(B[1]), batch)) / 2
    return 1.0 / per


def make_trace(name: str, n: int, rate: float, block_size: int, seed: int) -> list[SimRequest]:
    if name in ("shift", "bursty"):
        seconds = n / rate / 4
        phases = [Phase(seconds, rate, *(A if k % 2 == 0 else B)) for k in range(4)]
        return phased(phases, seed=seed, burstiness=1.0 if name == "shift" else 0.25)
    if name == "chat":
        turns = CHAT.turns
        return chat(replace(CHAT, conversations=max(1, n // turns), rate=rate / turns), block_size, seed=seed)
    raise ValueError(f"unknown trace {name!r}: shift, bursty or chat")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(res: SimResult, n: int, slo: SloConfig, duration: float) -> dict:
    """The table's figures of one run (``n`` requests offered over ``duration`` seconds)."""
    ttft, tpot, good = [], [], 0
    for j in res.jobs:
        t = j.first_at - j.req.arrival
        p = (j.finish_at - j.first_at) / (j.req.output - 1) if j.req.output > 1 else 0.0
        ttft.append(t)
        if j.req.output > 1:
            tpot.append(p)
        good += t <= slo.ttft_s and p <= slo.tpot_s
    busy = list(res.busy_s.values())
    mean_busy = statistics.fmean(busy) if busy else 0.0
    dec = res.decision_us
    return {"done": len(res.jobs), "refused": res.refused, "unfinished": n - len(res.jobs) - res.refused,
            "balance": max(busy) / mean_busy if mean_busy else float("nan"),
            "hit": res.hit_tokens / res.prompt_tokens if res.prompt_tokens else 0.0,
            "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99), "tpot50": pct(tpot, 0.5),
            "goodput": good / duration if duration else 0.0, "good_share": good / n if n else 0.0,
            "us_mean": statistics.fmean(dec) if dec else 0.0, "us99": pct(dec, 0.99),
            "changes": len(res.role_changes), "wall": res.wall_s, "events": res.events}


def run_one(size: int, label: str, policy: str, pd: bool, reqs: list[SimRequest], profile: InstanceProfile,
            slo: SloConfig, args) -> dict:
    roles = (("prefill",) * (size // 2) + ("decode",) * (size - size // 2)) if pd else ("mixed",) * size
    adaptive = AdaptivePDConfig(True, interval_s=1.0, window_s=10.0, hold_s=3.0, cooldown_s=10.0) if pd \
        else AdaptivePDConfig()
    cfg = SimConfig(roles, policy=policy, slo=slo, adaptive=adaptive, num_blocks=args.num_kv_blocks,
                    max_num_seqs=args.max_num_seqs, budget=args.max_num_batched_tokens)
    res = Simulation(cfg, [profile]).run(reqs)
    duration = reqs[-1].arrival - reqs[0].arrival if len(reqs) > 1 else 1.0
    return {"size": size, "label": label, **summarize(res, len(reqs), slo, duration)}


def rows_of(results: list[dict]) -> list[list]:
    return [[r["size"], r["label"], f"{r['balance']:.2f}", f"{100 * r['hit']:.1f}%", f"{r['ttft50']:.2f}",
             f"{r['ttft99']:.2f}", f"{1000 * r['tpot50']:.0f}", f"{r['goodput']:.1f} ({100 * r['good_share']:.0f}%)",
             f"{r['us_mean']:.0f} / {r['us99']:.0f}", r["changes"], r["refused"] + r["unfinished"],
             f"{r['wall']:.0f}"] for r in results]


HEADER = ["instances", "policy", "balance max/mean", "prefix hits", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms",
          "goodput req/s (share)", "router µs/decision mean / p99", "role changes", "lost", "sim wall s"]


def main(argv: list[str] | None = None) -> int:
    from bench.common import report, table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--requests", type=int, default=100_000, help="requests at the largest size")
    p.add_argument("--per-instance", type=int, default=100, help="requests per instance at most")
    p.add_argument("--traces", default="shift,bursty,chat")
    p.add_argument("--policies", default=",".join(POLICIES) + ",slo_aware+pd")
    p.add_argument("--profile", default=str(PROFILE), help="an InstanceProfile as JSON")
    p.add_argument("--load", type=float, default=0.7, help="offered rate over the estimated capacity")
    p.add_argument("--slo", default="ttft:10000,tpot:400", help="ms")
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(Path(__file__).parents[1] / "RESULTS.md"))
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from bench.common import parse_slos

    slos = parse_slos(args.slo)
    slo = SloConfig(slos["ttft"], slos["tpot"])
    profile = msgspec.json.decode(Path(args.profile).read_bytes(), type=InstanceProfile)
    per_instance = capacity(ServiceModel(profile), args.max_num_seqs // 2)
    results, traces_seen = {}, {}
    for trace in args.traces.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            n = min(args.requests, args.per_instance * size)
            reqs = make_trace(trace, n, args.load * per_instance * size, 16, args.seed)
            traces_seen[(trace, size)] = describe(reqs)
            for name in args.policies.split(","):
                policy, pd = name.removesuffix("+pd"), name.endswith("+pd")
                label = f"{policy}, PD + adaptive" if pd else policy
                r = run_one(size, label, policy, pd, reqs, profile, slo, args)
                results.setdefault(trace, []).append(r)
                print(f"{trace} {size} {label}: {r}", file=sys.stderr, flush=True)
    body = "\n\n".join(f"Trace `{t}`:\n\n" + "\n".join(f"- {s}: {traces_seen[(t, s)]}" for (tt, s) in traces_seen
                                                         if tt == t)
                       + "\n\n" + table(HEADER, rows_of(rs)) for t, rs in results.items())
    notes = [f"profile {Path(args.profile).name} (measured here by `python -m bench.sim.measure`): prefill "
             f"{profile.prefill}, decode {profile.decode}",
             f"offered rate {args.load:g} × {per_instance:.3f} req/s per instance (capacity estimated from the "
             f"profile); SLOs {args.slo}; --max-num-seqs {args.max_num_seqs}, --num-kv-blocks {args.num_kv_blocks}, "
             f"--max-num-batched-tokens {args.max_num_batched_tokens}; every instance has its own device",
             "lost: refused or unfinished an hour after the last arrival; balance: busiest instance's busy "
             "seconds over the mean; router µs: the policy's choice and its bookkeeping, timed in the simulator's "
             "process (one core of this shared VM)"]
    args.results = args.results
    report("Router at scale: the simulator (bench.sim)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
