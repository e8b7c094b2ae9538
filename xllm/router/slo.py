"""``slo_aware``: place each request where it is predicted to meet both latency targets
with the most room to spare (``--router-policy slo_aware --slo-ttft-ms T --slo-tpot-ms U``).

Predictions come from each instance's measured service times (``xllm.perf_model``: its
profile, published with its registration) and the router's load view of it (its last
report plus what was sent there since). For a request of ``L`` prompt tokens and ``O``
output tokens at most, on instance ``i`` holding ``h`` of its prompt's tokens in cache:

- ``TTFT_i = backlog_i + prefill_i(L, h)``: the prefill queued there before it (its waiting
  requests' prompts, those sent since its last report and what is left of the prompts it
  is computing: ``prefill_backlog_s``) and its own
  prefill after the cache hit; an instance that also decodes adds one step of its batch.
- ``TPOT_i = step_i(B + 1, C + L + O/2)``: its decode step with this request added, ``B``
  the requests it decodes or will (running, waiting there, sent since its report) and ``C``
  the context tokens they hold (its used KV blocks and the waiting prompts).
- ``slack_i = min(1 − TTFT_i / T, 1 − TPOT_i / U)``, and the candidate's score
  ``slack_i + LEAN · max(1 − TTFT_i / T, 1 − TPOT_i / U)`` (the looser target breaks what
  would be ties on the tighter one).

One instance that prefills and decodes (mixed, or a decode instance computing the prompt
itself): the largest score. A prefill/decode pair: the prefill instance with the
largest TTFT slack and the decode instance with the largest TPOT slack (the TTFT of a pair
is its prefill side's; the transfer runs beside the prefill). An instance short of KV
blocks or batch slots for the request counts only if none has room. When even the best
has negative slack the request misses a target wherever it goes: with ``reject`` it is
refused (``SloRefused``: HTTP 429 with the predictions), else it goes to the best.

A decision looks first at the holders of the prompt's deeper cached blocks (prefix index),
then walks the instances in order of prefill backlog and of decode step time (the registry
keeps both orders; the walks take turns), and stops as soon as no later instance can beat
the best score so far by more than ``TOLERANCE``: ``TTFT >= backlog + this prompt's prefill`` and
``TPOT >= step + this request's share of it`` bound the rest. It looks at ``MAX_LOOKS``
instances at most (in a fleet of alike instances many are within the tolerance of each
other): a decision costs a few instances, not the fleet. The bound takes each walked
instance's own model as the others' (exact when they share a profile).
"""

from __future__ import annotations

from typing import Iterator

from ..config import SloConfig
from ..protocol import TokenizedRequest
from .prefix_index import PrefixIndex
from .registry import InstanceState, Registry

MANY_HOLDERS = 8  # a cached block held by more instances than this is common: not a reason to look
MAX_LOOKS = 32  # instances a decision looks at, at most
TOLERANCE = 0.02  # score (a share of the targets) a decision may leave on the table to stop early
LEAN = 0.25  # what the slack against the looser target adds to a candidate's score


class SloRefused(Exception):
    """No instance is predicted to meet both targets (and refusing was asked for)."""


class Prediction:
    """One candidate's predicted latency for a request."""

    __slots__ = ("inst", "ttft", "tpot", "slack", "score", "fits")

    def __init__(self, inst: InstanceState, ttft: float, tpot: float, ttft_slack: float, tpot_slack: float,
                 fits: bool) -> None:
        self.inst, self.ttft, self.tpot, self.fits = inst, ttft, tpot, fits
        self.slack = min(ttft_slack, tpot_slack)
        self.score = score(ttft_slack, tpot_slack)

    def beats(self, other: "Prediction | None") -> bool:
        return other is None or (self.fits, self.score) > (other.fits, other.score)


def score(ttft_slack: float, tpot_slack: float) -> float:
    """How good a candidate is: its slack against the tighter target, plus ``LEAN`` of the
    other's (rises with either slack, so a bound on both bounds it).

    NOTE: the tighter slack alone ties every instance where the same target binds (alike
    idle instances all predict the same TTFT for a long prompt), and a tie went to the first
    in backlog order whatever its decode batch: on mixed instances the policy packed
    (``bench.sim``: TPOT p50 331 ms at 100 instances, goodput 59% against round robin's 93%)."""
    return min(ttft_slack, tpot_slack) + LEAN * max(ttft_slack, tpot_slack)


class SloAware:
    """The most slack against both latency targets (see the module docstring)."""

    name = "slo_aware"

    def __init__(self, index: PrefixIndex, slo: SloConfig) -> None:
        if not slo.set:
            raise ValueError("slo_aware needs a TTFT and a TPOT target")
        self.index = index
        self.ttft_s, self.tpot_s, self.reject = slo.ttft_s, slo.tpot_s, slo.reject

    # -- the verbs the router calls -------------------------------------------------------------
    def choose(self, req: TokenizedRequest, registry: Registry) -> InstanceState | None:
        """One instance to prefill and decode ``req``; None when there is none."""
        best = self._search(req, registry, ttft=True, tpot=True)
        return self._verdict(best, None)

    def choose_pair(self, req: TokenizedRequest, prefill: Registry,
                    decode: Registry) -> tuple[InstanceState, InstanceState] | None:
        """A prefill instance (the most TTFT slack) and a decode instance (the most TPOT slack)."""
        pre = self._search(req, prefill, ttft=True, tpot=False)
        dec = self._search(req, decode, ttft=False, tpot=True)
        if pre is None or dec is None:
            return None
        self._verdict(pre, dec)
        return pre.inst, dec.inst

    def predict(self, req: TokenizedRequest, inst: InstanceState, ttft: bool = True,
                tpot: bool = True, depth: int | None = None) -> Prediction:
        """``inst``'s predicted TTFT (if it prefills) and TPOT (if it decodes) for ``req``;
        ``depth``: the most blocks of the prompt it can hold (known by the caller)."""
        model, n, out = inst.service, len(req.prompt_token_ids), req.sampling.max_tokens or 1
        hashes = req.block_hashes if depth is None else req.block_hashes[:depth]
        hit = min(self.index.deepest(inst.id, hashes) * inst.block_size, n - 1) if ttft else 0
        first = inst.prefill_backlog_s + model.prefill_s(n, hit) if ttft else 0.0
        if ttft and tpot:
            first += inst.decode_step_s  # the prompt shares its steps with the running batch
        per = model.decode_step_s(inst.decode_batch + inst.joining + 1,
                                  inst.context_tokens + inst.joining_tokens + n + out // 2) if tpot else 0.0
        ttft_slack = 1.0 - first / self.ttft_s if ttft else 1.0
        tpot_slack = 1.0 - per / self.tpot_s if tpot else 1.0
        need = -(-(n + (out if tpot else 1)) // inst.block_size)
        fits = inst.free_blocks - inst.pending_blocks >= need and (
            not tpot or inst.decode_batch < inst.max_num_seqs)
        return Prediction(inst, first, per, ttft_slack, tpot_slack, fits)

    # -- internals ------------------------------------------------------------------------------
    def _verdict(self, one: Prediction | None, other: Prediction | None) -> InstanceState | None:
        """``one`` (with ``other``, a pair) is the best there is; refuse it if asked and it misses."""
        if one is None:
            return None
        missed = [p for p in (one, other) if p is not None and (p.slack < 0 or not p.fits)]
        if missed and self.reject:
            ttft = max(p.ttft for p in (one, other) if p is not None)
            tpot = max(p.tpot for p in (one, other) if p is not None)
            room = "" if all(p.fits for p in (one, other) if p is not None) else "; no instance has room for it now"
            raise SloRefused(f"no instance is predicted to meet the SLOs (TTFT {self.ttft_s * 1000:.0f} ms, TPOT "
                             f"{self.tpot_s * 1000:.0f} ms): the best predicts TTFT {ttft * 1000:.0f} ms, TPOT "
                             f"{tpot * 1000:.0f} ms{room}")
        return one.inst

    def _search(self, req: TokenizedRequest, registry: Registry, ttft: bool, tpot: bool) -> Prediction | None:
        """The best prediction over ``registry``: the cache holders first, then the walks."""
        if not registry.instances:
            return None
        best: Prediction | None = None
        seen: set[str] = set()
        holders, hit_bound = self._holders(req, registry) if ttft else ([], 0)
        for inst in holders:
            seen.add(inst.id)
            p = self.predict(req, inst, ttft, tpot)
            if p.beats(best):
                best = p
        walks = [w for w in ((self._ttft_walk(req, registry, hit_bound) if ttft else None),
                             (self._tpot_walk(req, registry) if tpot else None)) if w is not None]
        bounds = [1.0, 1.0]  # the most TTFT and TPOT slack an instance not looked at can have
        dims = [0 if ttft else 1] if len(walks) == 1 else [0, 1]
        k = 0
        while True:
            entry = next(walks[k], None)
            if entry is None:
                return best  # one order walked to its end: every instance was looked at
            bounds[dims[k]], inst = entry
            if inst.id not in seen:
                seen.add(inst.id)
                p = self.predict(req, inst, ttft, tpot, hit_bound)
                if p.beats(best):
                    best = p
            # NOTE: the orders take turns: one order's bound can stay put for many instances
            # (alike idle instances all have no backlog) while the other's finds the best
            k = (k + 1) % len(walks)
            if best.fits and best.score >= score(*bounds) - TOLERANCE:
                return best  # no instance further down either order can do (much) better
            if len(seen) >= MAX_LOOKS:
                return best

    def _holders(self, req: TokenizedRequest, registry: Registry) -> tuple[list[InstanceState], int]:
        """The instances holding the prompt's deeper blocks (those few instances hold), and the
        deepest hit (in blocks) any other instance can have: the depth where a block is held
        by many (anyone may hold it), else none."""
        found: dict[str, InstanceState] = {}
        for depth in range(len(req.block_hashes), 0, -1):
            holders = self.index.holders.get(req.block_hashes[depth - 1])
            if not holders:
                continue
            if len(holders) > MANY_HOLDERS:
                return list(found.values()), depth  # common from here down: the walks find them
            for iid in holders:
                inst = registry.instances.get(iid)
                if inst is not None:
                    found.setdefault(iid, inst)
        return list(found.values()), 0

    def _ttft_walk(self, req: TokenizedRequest, registry: Registry,
                   hit_bound: int) -> Iterator[tuple[float, InstanceState]]:
        """(the most TTFT slack any instance from here on can have, instance), by backlog;
        ``hit_bound``: the most blocks of the prompt such an instance may hold."""
        n = len(req.prompt_token_ids)
        for backlog, inst in registry.by_backlog():
            hit = min(hit_bound * inst.block_size, n - 1)
            yield 1.0 - (backlog + inst.service.prefill_s(n, hit)) / self.ttft_s, inst

    def _tpot_walk(self, req: TokenizedRequest, registry: Registry) -> Iterator[tuple[float, InstanceState]]:
        """(the most TPOT slack any instance from here on can have, instance), by decode step."""
        n, out = len(req.prompt_token_ids), req.sampling.max_tokens or 1
        for step, inst in registry.by_decode_step():
            m = inst.service
            yield 1.0 - (step + m.d1 + m.d2 * (n + out // 2)) / self.tpot_s, inst
