"""Adaptive PD: a controller that changes how many instances prefill and how many decode
while the deployment runs (``--adaptive-pd``), because a fixed split wastes capacity when
prompt and output lengths swing.

It sees what arrives (the router tells it every request it places: prompt tokens to
prefill after the cache hit, output tokens at most) as sums decayed over ``window_s``,
and the instances' profiles and reports. For each split of the ``N`` prefill and decode
instances into ``p`` prefill and ``d = N − p`` decode it predicts each side's pressure, the
predicted latency over its target (``xllm.perf_model`` gives the service times):

- prefill, an M/G/1 queue per instance fed ``λ/p`` requests a second, each taking
  ``S = prefill(L, cached)``: ``TTFT = E[S] + (λ/p)·E[S²] / (2(1 − ρ))``, ``ρ = (λ/p)·E[S]``;
  pressure ``TTFT / T``.
- decode, ``x = λ·E[O] / d`` tokens a second per instance with a step of
  ``d0 + d1·B + d2·B·c`` (``c`` the mean context, weighted by tokens): in steady state
  ``B = x·step``, so ``TPOT = step = d0 / (1 − ρ)``, ``ρ = (d1 + d2·c)·x``; pressure
  ``max(TPOT / U, B / max_num_seqs, B·c / KV tokens)`` (a batch the slots or the KV pool
  cannot hold queues, which TTFT pays).

A saturated side (``ρ`` near 1) has pressure ``100·ρ``, so a worse overload ranks worse.
The split's score is the larger of its two pressures; the best split has the least.

The split is wrong when the current one is predicted to miss a target (score > 1) or the
instances' reports say one is missed (their recent mean TTFT or TPOT), and another split
scores at least ``margin`` better. Hysteresis: it must stay wrong, in the same direction,
for ``hold_s``; after a change no other starts for ``cooldown_s``; one change at a time,
and at least one instance of each role always (``p`` runs from 1 to ``N − 1``). A change
moves the split towards the best one by one instance, or by up to ``MAX_STEP`` of the
instances in a large deployment. The instances that flip are those with the least to
drain: the prefill instances with the least backlog, the decode instances with the
quickest step (fewest requests).

Pure: no sockets, no clock of its own (every verb takes ``now``), so a scripted load and a
fake clock test it, and the simulator (``bench.sim``) drives the same class.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ..config import AdaptivePDConfig, SloConfig
from ..perf_model import NOMINAL, ServiceModel
from ..protocol import InstanceProfile
from .registry import InstanceState, Registries

SATURATED = 0.98  # utilization past which a side counts as overloaded
MAX_STEP = 0.1  # of the prefill and decode instances, the most one change moves


@dataclass
class Flip:
    """Change one instance's role."""

    instance_id: str
    role: str  # the role it takes
    reason: str


@dataclass
class Demand:
    """What arrives, as sums decayed with time constant ``window_s``."""

    window_s: float
    start: float
    last: float = 0.0
    n: float = 0.0  # requests
    s1: float = 0.0  # sum of prefill seconds
    s2: float = 0.0  # sum of squared prefill seconds
    out: float = 0.0  # output tokens
    ctx: float = 0.0  # sum over requests of O·(L + O/2): output tokens weighted by their context
    prompt: float = 0.0  # prompt tokens

    def add(self, now: float, prefill_s: float, prompt: int, out: int) -> None:
        self._decay(now)
        self.n += 1
        self.s1 += prefill_s
        self.s2 += prefill_s * prefill_s
        self.out += out
        self.ctx += out * (prompt + out / 2)
        self.prompt += prompt

    def _decay(self, now: float) -> None:
        if now > self.last:
            f = math.exp(-(now - self.last) / self.window_s)
            self.n, self.s1, self.s2, self.out, self.ctx, self.prompt = (
                x * f for x in (self.n, self.s1, self.s2, self.out, self.ctx, self.prompt))
            self.last = now

    def rate(self, now: float) -> float:
        """Requests a second: the decayed count over the decayed time observed."""
        self._decay(now)
        seen = self.window_s * (1.0 - math.exp(-max(now - self.start, 1e-9) / self.window_s))
        return self.n / seen


@dataclass
class Split:
    """One way to split the prefill/decode instances, and what it is predicted to do."""

    prefill: int
    decode: int
    ttft_s: float  # predicted (inf: saturated)
    tpot_s: float
    prefill_pressure: float
    decode_pressure: float

    @property
    def score(self) -> float:
        return max(self.prefill_pressure, self.decode_pressure)


@dataclass
class Change:
    """The instances a change moves that have not switched yet."""

    started: float
    pending: set[str] = field(default_factory=set)


@dataclass
class RoleController:
    """Decides role changes (see the module docstring). Verbs: observe, step, finished,
    expired."""

    slo: SloConfig
    cfg: AdaptivePDConfig
    now: float  # when it started
    demand: Demand = field(init=False)
    changing: Change | None = None  # the change under way
    last_change: float = -math.inf  # when the last change ended
    wrong_since: float | None = None  # since when the split has looked wrong, in this direction
    direction: int = 0  # +1: more prefill wanted, -1: more decode
    model: ServiceModel = field(default_factory=lambda: ServiceModel(NOMINAL))
    last: dict = field(default_factory=dict)  # the last evaluation, for stats and logs

    def __post_init__(self) -> None:
        if not self.slo.set:
            raise ValueError("--adaptive-pd needs both --slo-ttft-ms and --slo-tpot-ms")
        self.demand = Demand(self.cfg.window_s, self.now, self.now)

    # -- the router tells it ------------------------------------------------------------------
    def observe(self, now: float, prompt: int, cached: int, out: int) -> None:
        """A request was placed: ``prompt`` tokens (``cached`` of them in cache where it
        prefills), ``out`` output tokens at most."""
        self.demand.add(now, self.model.prefill_s(prompt, cached), prompt, out)

    def finished(self, now: float, instance_id: str) -> None:
        """``instance_id`` has switched (or refused, or is lost); the change is over when all
        of its instances have."""
        if self.changing is None:
            return
        self.changing.pending.discard(instance_id)
        if not self.changing.pending:
            self.changing = None
            self.last_change = now
            self.wrong_since, self.direction = None, 0

    def expired(self, now: float) -> list[str]:
        """The instances whose change has taken too long (the drain timeout and then some):
        the router puts them back in service in the role they have."""
        if self.changing is not None and now - self.changing.started > self.cfg.drain_timeout_s + 10.0:
            return sorted(self.changing.pending)
        return []

    # -- the decision -------------------------------------------------------------------------
    def step(self, pools: Registries, now: float) -> list[Flip]:
        """Look at the split once; the role changes to make now (none, mostly)."""
        prefill, decode = pools.pool("prefill"), pools.pool("decode")
        p, d = len(prefill), len(decode)
        self._update_model(list(prefill.instances.values()) + list(decode.instances.values()))
        if self.changing is not None or p + d < 2 or p == 0 or d == 0:
            return []
        splits = [self.predict(k, p + d, now, pools) for k in range(1, p + d)]
        current, best = splits[p - 1], min(splits, key=lambda s: (s.score, abs(s.prefill - p)))
        measured = self._measured(pools)
        self.last = {"prefill": p, "decode": d, "best_prefill": best.prefill, "score": current.score,
                     "best_score": best.score, "ttft_s": current.ttft_s, "tpot_s": current.tpot_s,
                     "measured_ttft_s": measured[0], "measured_tpot_s": measured[1],
                     "rate": self.demand.rate(now)}
        missing = current.score > 1.0 or measured[0] > self.slo.ttft_s or measured[1] > self.slo.tpot_s
        if best.prefill == p or not missing or best.score > (1.0 - self.cfg.margin) * current.score:
            self.wrong_since, self.direction = None, 0
            return []
        direction = 1 if best.prefill > p else -1
        if direction != self.direction or self.wrong_since is None:
            self.wrong_since, self.direction = now, direction
        if now - self.wrong_since < self.cfg.hold_s or now - self.last_change < self.cfg.cooldown_s:
            return []
        count = min(abs(best.prefill - p), max(1, int(MAX_STEP * (p + d))))
        walk = prefill.by_backlog() if direction < 0 else decode.by_decode_step()
        moving = [inst for _, inst in itertools.islice(walk, count)]  # the least to drain first
        role = "prefill" if direction > 0 else "decode"
        self.changing = Change(now, {inst.id for inst in moving})
        reason = (f"{p} prefill + {d} decode predicted TTFT {_ms(current.ttft_s)}, TPOT {_ms(current.tpot_s)} "
                  f"(pressure {current.score:.2f}; measured TTFT {_ms(measured[0])}, TPOT {_ms(measured[1])}); "
                  f"{best.prefill} + {best.decode} predicted TTFT {_ms(best.ttft_s)}, TPOT {_ms(best.tpot_s)} "
                  f"(pressure {best.score:.2f}) at {self.last['rate']:.2f} req/s")
        return [Flip(inst.id, role, reason) for inst in moving]

    def predict(self, p: int, n: int, now: float, pools: Registries) -> Split:
        """What ``p`` prefill and ``n − p`` decode instances are predicted to do with the
        demand seen."""
        dm, m = self.demand, self.model
        lam = dm.rate(now)
        d = n - p
        # prefill: M/G/1 per instance
        es = dm.s1 / dm.n if dm.n > 0 else 0.0
        es2 = dm.s2 / dm.n if dm.n > 0 else 0.0
        lam_p = lam / p
        rho_p = lam_p * es
        if rho_p < SATURATED:
            ttft = es + lam_p * es2 / (2.0 * (1.0 - rho_p))
            pre = ttft / self.slo.ttft_s
        else:
            ttft, pre = math.inf, 100.0 * rho_p
        # decode: x tokens a second per instance, steps of d0 + (d1 + d2·c)·B
        x = lam * (dm.out / dm.n if dm.n > 0 else 0.0) / d
        c = dm.ctx / dm.out if dm.out > 0 else 0.0
        rho_d = (m.d1 + m.d2 * c) * x
        slots, kv_tokens = self._decode_capacity(pools)
        if rho_d < SATURATED:
            tpot = m.d0 / (1.0 - rho_d)
            batch = x * tpot
            dec = max(tpot / self.slo.tpot_s, batch / slots, batch * c / kv_tokens)
        else:
            tpot, dec = math.inf, 100.0 * rho_d
        return Split(p, d, ttft, tpot, pre, dec)

    # -- internals ------------------------------------------------------------------------------
    def _update_model(self, instances: list[InstanceState]) -> None:
        """The typical instance: the mean of the known profiles."""
        models = [i.model for i in instances if i.model is not None]
        if models:
            mean = [sum(getattr(mm, k) for mm in models) / len(models) for k in ("p0", "p1", "p2", "d0", "d1", "d2")]
            self.model = ServiceModel(InstanceProfile(tuple(mean[:3]), tuple(mean[3:])))

    @staticmethod
    def _decode_capacity(pools: Registries) -> tuple[float, float]:
        """Batch slots and KV tokens of one typical prefill or decode instance."""
        insts = [i for r in ("prefill", "decode") for i in pools.pool(r).instances.values()]
        slots = sum(i.max_num_seqs for i in insts) / len(insts)
        kv = sum(i.num_blocks * i.block_size for i in insts) / len(insts)
        return slots, kv

    @staticmethod
    def _measured(pools: Registries) -> tuple[float, float]:
        """The mean TTFT and TPOT the decode (and mixed) instances report lately (0: none)."""
        loads = [i.load for r in ("decode", "mixed") for i in pools.pool(r).instances.values() if i.load]
        ttfts = [ld.ttft_s for ld in loads if ld.ttft_s > 0]
        tpots = [ld.tpot_s for ld in loads if ld.tpot_s > 0]
        return (sum(ttfts) / len(ttfts) if ttfts else 0.0, sum(tpots) / len(tpots) if tpots else 0.0)


def _ms(seconds: float) -> str:
    return "inf" if math.isinf(seconds) else f"{seconds * 1000:.0f} ms"
