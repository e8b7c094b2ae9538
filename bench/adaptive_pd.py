"""Adaptive PD on this machine: three instances serve a workload that shifts from
prompt-heavy to output-heavy, as static splits (2 prefill + 1 decode, 1 + 2) and with
``--adaptive-pd`` (starting as 1 + 2); then the simulator runs the same trace on the profiles
the instances measured, as the check that ties it to these runs.

    python -m bench.adaptive_pd [--phase-seconds 75] [--slo ttft:5000,tpot:150]

The trace (``bench.sim.traces.phased``, seeded): phase A, ``--rate-a`` requests a second of
prompts of 384-640 tokens and 8-24 output tokens; phase B, ``--rate-b`` requests a second of
32-96 token prompts and 192-320 output tokens; Poisson arrivals, streamed through the SDK
(greedy, EOS ignored), each at its arrival time whatever the others do. Every configuration
uses ``--router-policy slo_aware`` with the SLO targets, float32, eager steps (one thread per worker:
three workers on two cores) and the same limits.

Reported: per configuration and phase, goodput (requests of that phase that met both SLOs,
per second of the phase) and mean TTFT/TPOT; the adaptive run's role changes; and per
configuration the simulator's mean TTFT and TPOT against the run's (their ratio).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time

import uvloop

from xllm.config import AdaptivePDConfig, SloConfig
from xllm.protocol import InstanceProfile
from xllm.sdk import AsyncClient

from .common import (BenchRequest, RequestRecord, add_launch_args, base_parser, meets_slos, parse_slos, random_prompt,
                     report, resolve_model, table, vocab_size)
from .drive import deployment, stream_request, warm_up
from .sim.engine import SimConfig, Simulation
from .sim.traces import Phase, SimRequest, phased

LIMITS = ["--dtype", "float32", "--threads-per-worker", "1", "--enforce-eager", "--max-num-seqs", "32",
          "--num-kv-blocks", "2048", "--router-policy", "slo_aware"]


def configs(args) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """Label -> (initial roles, xllm-launch flags)."""
    adaptive = ["--adaptive-pd", "--adaptive-pd-window", str(args.window), "--adaptive-pd-hold", str(args.hold),
                "--adaptive-pd-cooldown", str(args.cooldown)]
    return {"static 2P+1D": (("prefill", "prefill", "decode"), ["--pd", "2:1"]),
            "static 1P+2D": (("prefill", "decode", "decode"), ["--pd", "1:2"]),
            "adaptive, from 1P+2D": (("prefill", "decode", "decode"), ["--pd", "1:2", *adaptive])}


def trace(args) -> list[SimRequest]:
    return phased([Phase(args.phase_seconds, args.rate_a, (384, 640), (8, 24)),
                   Phase(args.phase_seconds, args.rate_b, (32, 96), (192, 320))], seed=args.seed)


async def replay(address: str, reqs: list[SimRequest], vocab: int, seed: int, limit_s: float):
    """Send every request at its arrival time; the records, the router's role changes seen
    (seconds from the start, instance, role) and the final stats."""
    rng = random.Random(seed)
    prompts = [BenchRequest(random_prompt(rng, r.prompt, vocab), r.output) for r in reqs]
    async with AsyncClient(address) as c:
        await warm_up(c, vocab)
        roles = dict((await c.call("stats"))["router"]["roles"])
        changes: list[tuple[float, str, str]] = []
        t0 = time.perf_counter()
        done = asyncio.Event()

        async def one(req: BenchRequest, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await asyncio.wait_for(stream_request(c, req), limit_s)

        async def watch() -> None:
            while not done.is_set():
                now = (await c.call("stats"))["router"]["roles"]
                for iid, role in now.items():
                    if roles.get(iid) != role:
                        changes.append((time.perf_counter() - t0, iid, role))
                roles.update(now)
                await asyncio.sleep(0.5)

        watcher = asyncio.ensure_future(watch())
        records = await asyncio.gather(*(one(p, r.arrival) for p, r in zip(prompts, reqs)), return_exceptions=True)
        done.set()
        await watcher
        stats = await c.call("stats")
    return [r if isinstance(r, RequestRecord) else _failed(p, r) for r, p in zip(records, prompts)], changes, stats


def _failed(req: BenchRequest, exc: BaseException) -> RequestRecord:
    rec = RequestRecord(len(req.prompt), 0.0)
    rec.error = f"{type(exc).__name__}: {exc}"
    return rec


def simulate(roles: tuple[str, ...], profiles: list[InstanceProfile], reqs: list[SimRequest], slo: SloConfig,
             adaptive: AdaptivePDConfig | None, cores: float) -> list[tuple[float, float | None, bool]]:
    """The simulator on the same trace, its workers sharing ``cores``: per request (TTFT,
    TPOT, finished)."""
    cfg = SimConfig(roles, policy="slo_aware", slo=slo, adaptive=adaptive or AdaptivePDConfig(),
                    num_blocks=2048, max_num_seqs=32, budget=2048, cores=cores)
    res = Simulation(cfg, profiles).run(reqs)
    by_seq = {j.seq: j for j in res.jobs}
    out = []
    for n, r in enumerate(reqs):
        j = by_seq.get(n)
        if j is None:
            out.append((float("nan"), None, False))
        else:
            out.append((j.first_at - r.arrival, (j.finish_at - j.first_at) / (r.output - 1) if r.output > 1 else None,
                        True))
    return out


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) of each of the deployment's processes and of this one."""
    out = {"client": sum(os.times()[:2])}
    for name, pid in pids.items():
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _coef(c) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in c) + ")"


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--phase-seconds", type=float, default=75.0)
    p.add_argument("--rate-a", type=float, default=0.5, help="phase A (prompt-heavy) requests a second")
    p.add_argument("--rate-b", type=float, default=0.45, help="phase B (output-heavy) requests a second")
    p.add_argument("--slo", default="ttft:5000,tpot:150", help="ttft and tpot targets, ms")
    p.add_argument("--window", type=float, default=5.0, help="--adaptive-pd-window")
    p.add_argument("--hold", type=float, default=2.0, help="--adaptive-pd-hold")
    p.add_argument("--cooldown", type=float, default=10.0, help="--adaptive-pd-cooldown")
    p.add_argument("--only", default="", help="run only the configurations whose label contains this")
    add_launch_args(p)
    args = p.parse_args(argv)
    slos = parse_slos(args.slo)
    slo = SloConfig(slos["ttft"], slos["tpot"])
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    reqs = trace(args)
    phase_of = [r.phase for r in reqs]
    runs, loads, measured, cores = {}, {}, [], {}
    for label, (roles, flags) in configs(args).items():
        if args.only and args.only not in label:
            continue
        flags = [*LIMITS, *flags, "--slo-ttft-ms", str(slos["ttft"] * 1000), "--slo-tpot-ms",
                 str(slos["tpot"] * 1000), *args.launch_args.split()]
        with deployment(model_dir, flags, label) as dep:
            cpu0, wall0 = _cpu(dep.pids), time.perf_counter()
            runs[label] = uvloop.run(replay(dep.address, reqs, vocab, args.seed, 300.0))
            cpu1, wall = _cpu(dep.pids), time.perf_counter() - wall0
        # NOTE: the workers share the cores with every other process of the deployment (and
        # this client): the simulator gets the cores those left, as measured over the run
        others = sum(cpu1[k] - cpu0.get(k, cpu1[k]) for k in cpu1 if "worker" not in k) / wall
        cores[label] = (max(1.0, (os.cpu_count() or 1) - others), others)
        loads[label] = os.getloadavg()[0]
        records, changes, stats = runs[label]
        print(f"{label}: {sum(r.ok for r in records)}/{len(records)} finished; role changes {changes}", flush=True)

    rows, sim_rows, change_rows = [], [], []
    for label, (records, changes, stats) in runs.items():
        roles, _ = configs(args)[label]
        good = [meets_slos(r, slos) for r in records]
        for k in (0, 1, None):
            idx = [i for i, ph in enumerate(phase_of) if k is None or ph == k]
            seconds = args.phase_seconds * (2 if k is None else 1)
            rows.append([label, "A (prompt-heavy)" if k == 0 else "B (output-heavy)" if k == 1 else "whole run",
                         sum(good[i] for i in idx) / seconds, f"{sum(good[i] for i in idx)}/{len(idx)}",
                         _mean(records[i].ttft * 1000 for i in idx if records[i].ok),
                         _mean(records[i].tpot * 1000 if records[i].tpot else None for i in idx if records[i].ok)])
        profiles = [InstanceProfile(**stats["instances"][f"i{k}"]["profile"]) for k in range(len(roles))]
        measured.append(f"{label}: " + "; ".join(
            f"p {_coef(q.prefill)}, d {_coef(q.decode)} (fit error {q.prefill_error:.0%} / {q.decode_error:.0%})"
            for q in profiles))
        adaptive = AdaptivePDConfig(True, window_s=args.window, hold_s=args.hold, cooldown_s=args.cooldown) \
            if "adaptive" in label else None
        sim = simulate(roles, profiles, reqs, slo, adaptive, cores[label][0])
        real_ttft = _mean(r.ttft for r in records if r.ok)
        real_tpot = _mean(r.tpot for r in records if r.ok)
        sim_ttft, sim_tpot = _mean(s[0] for s in sim if s[2]), _mean(s[1] for s in sim if s[2])
        sim_good = sum(s[2] and s[0] <= slos["ttft"] and (s[1] or 0.0) <= slos["tpot"] for s in sim)
        sim_rows.append([label, real_ttft * 1000, sim_ttft * 1000, sim_ttft / real_ttft, real_tpot * 1000,
                         sim_tpot * 1000, sim_tpot / real_tpot, f"{sum(good)} / {sim_good}"])
        change_rows += [[label, f"{t:.1f}", iid, role] for t, iid, role in changes]
    body = (table(["configuration", "phase", "goodput req/s", "met SLOs", "TTFT mean ms", "TPOT mean ms"], rows)
            + "\n\nRole changes seen by the router (seconds from the first request; phase B starts at "
            f"{args.phase_seconds:g} s):\n\n"
            + (table(["configuration", "at s", "instance", "new role"], change_rows) if change_rows else "none")
            + "\n\nThe simulator on the same trace, on the profiles these instances measured at start:\n\n"
            + table(["configuration", "TTFT real ms", "TTFT sim ms", "sim/real", "TPOT real ms", "TPOT sim ms",
                     "sim/real", "met SLOs real / sim"], sim_rows))
    notes = [f"model {model_dir.name}; 3 instances on this 2-core VM (one thread per worker: three workers share two "
             f"cores); flags {' '.join(LIMITS)} and the SLO targets in every configuration",
             f"trace: phase A {args.phase_seconds:g} s at {args.rate_a:g} req/s (prompts 384-640, outputs 8-24), phase B "
             f"{args.phase_seconds:g} s at {args.rate_b:g} req/s (prompts 32-96, outputs 192-320), Poisson, seed "
             f"{args.seed}; goodput counts a request in the phase it arrived in",
             f"SLOs {args.slo} (ms); adaptive: --adaptive-pd-window {args.window:g} --adaptive-pd-hold {args.hold:g} "
             f"--adaptive-pd-cooldown {args.cooldown:g}",
             "this machine is shared and noisy: compare configurations within this run, not with other runs; "
             "load average (1 min) at the end of each run: " + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()),
             "the simulator's workers share the cores the deployment's other processes and this client left "
             "(CPU time over the run's wall time): " + ", ".join(
                 f"{k} {c:.2f} (others {o:.2f})" for k, (c, o) in cores.items()),
             "profiles the instances published (prefill p0, p1, p2; decode d0, d1, d2): " + " | ".join(measured)]
    report("Adaptive PD against static splits (3 instances)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
