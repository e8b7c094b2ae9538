"""Where a request goes: the router's policies (``--router-policy``).

Each policy picks one instance of the registry for a request, or None when there is
none. Their formulas, as the README states them:

- ``round_robin``: the instances in turn.
- ``kv_cache_aware``: the instance with the largest share of free KV blocks, counting
  the prompt blocks of the requests sent to it since its last report.
- ``prefix_cache_aware``: the instance minimising, in KV blocks of prefill,
  ``cost = prefill + balance * work``, with
  ``prefill = sum(w[tier(b)] for b in the prompt's first hit_blocks) + (prompt_blocks - hit_blocks)``:
  the prefill this request needs there. ``hit_blocks`` is the depth of the prompt's deepest
  full block the instance holds in any tier (the global prefix index; a block's hash chains
  its parents', so holding it means holding the prefix up to it, unless a parent alone was
  evicted: the index is a hint). Each block up to it costs the weight of the fastest tier
  holding it there: ``w[device] = 0``, ``w[host]`` and ``w[disk]`` the load-back seconds per
  token from that tier over the prefill seconds per token (``--router-tier-weights``,
  measured by ``bench.tier_cost``), ``1`` for a block it does not hold; so a device hit
  beats a host hit beats a disk hit beats recomputing. Weights of 1 are the device-only
  view (lower tiers count as misses). ``work`` is what is queued there before it:
  its waiting requests' blocks and the prefill of the requests sent since its last
  report, plus each running or just-sent request at what its decoding costs there: the
  decode time it adds over the rest of its output, ``(d1 + d2·context per request) · n/2``
  (``n``: the instance's recent mean output), in blocks of prefill time (from the instance's
  profile; 1 block without one). A cache hit is worth exactly
  the prefill it saves, so conversations stay where their history is while the instances
  are about as busy, and an instance whose queue outgrows what its cache saves stops
  attracting requests (``balance`` = 1): one hot instance cannot take everything.

  A decision walks the prompt's blocks from the deepest and stops as soon as no shallower
  hit can beat the best cost so far (even on the least loaded instance); among many
  holders of one block (a shared system prompt) it takes the least loaded one straight
  from the load order. So it costs about the prompt's length, not the number of instances.
- ``slo_aware``: the instance with the most slack against both latency targets,
  ``min(1 − TTFT_i / T, 1 − TPOT_i / U)``, predicted from its measured service times (the
  formulas are in ``xllm.router.slo``).
"""

from __future__ import annotations

import itertools

from ..protocol import TokenizedRequest
from .prefix_index import PrefixIndex
from .registry import InstanceState, Registry

from ..config import ROUTER_POLICIES as POLICIES


class RoundRobin:
    """The instances in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, req: TokenizedRequest, registry: Registry) -> InstanceState | None:
        if not registry.instances:
            return None
        ids = list(registry.instances)
        return registry.instances[ids[next(self._turn) % len(ids)]]


class KVCacheAware:
    """The largest share of free KV memory."""

    name = "kv_cache_aware"

    def choose(self, req: TokenizedRequest, registry: Registry) -> InstanceState | None:
        return registry.most_free()


class PrefixCacheAware:
    """The longest cached prefix, traded against load (see the module's docstring)."""

    name = "prefix_cache_aware"

    def __init__(self, index: PrefixIndex, balance: float = 1.0,
                 tier_weights: tuple[float, ...] = (0.0, 1.0, 1.0)) -> None:
        self.index = index
        self.balance = balance
        self.weights = tier_weights  # per tier of KV_TIERS: a held block's cost in blocks of prefill

    def choose(self, req: TokenizedRequest, registry: Registry) -> InstanceState | None:
        least = registry.least_loaded()
        if least is None:
            return None
        hashes, holders_of, balance, index = req.block_hashes, self.index.holders, self.balance, self.index
        n = len(hashes)
        floor = balance * least.work  # no instance has less work in it
        best, best_cost = least, n + floor
        seen: set[str] = set()
        many = max(8, len(registry) // 8)  # holders beyond this: pick from the load order
        for depth in range(n, 0, -1):
            if n - depth + floor >= best_cost:
                break  # nothing at this depth or shallower can win
            holders = holders_of.get(hashes[depth - 1])
            if not holders:
                continue
            if len(holders) > many:
                pick = registry.least_loaded_of(holders)
                candidates = [pick] if pick is not None else []
            else:
                candidates = [registry.instances.get(i) for i in holders if i not in seen]
            for inst in candidates:
                if inst is None:
                    continue
                seen.add(inst.id)
                cost = index.prefill_cost(inst.id, hashes, self.weights, depth) + balance * inst.work
                if cost < best_cost:
                    best, best_cost = inst, cost
        return best


def make_policy(name: str, index: PrefixIndex, slo=None, tier_weights: tuple[float, ...] = (0.0, 1.0, 1.0)):
    """The policy called ``name`` (one of ``POLICIES``); ``slo_aware`` takes the targets
    (a ``config.SloConfig``), ``prefix_cache_aware`` each KV tier's weight (device first)."""
    if name == "round_robin":
        return RoundRobin()
    if name == "kv_cache_aware":
        return KVCacheAware()
    if name == "prefix_cache_aware":
        return PrefixCacheAware(index, tier_weights=tier_weights)
    if name == "slo_aware":
        from .slo import SloAware

        return SloAware(index, slo)
    raise ValueError(f"router policy must be one of {', '.join(POLICIES)}; got {name!r}")
