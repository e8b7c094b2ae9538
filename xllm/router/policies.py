"""Where a request goes: the router's policies (``--router-policy``).

Each policy picks one instance of the registry for a request, or None when there is
none. Their formulas, as the README states them:

- ``round_robin``: the instances in turn.
- ``kv_cache_aware``: the instance with the largest share of free KV blocks, counting
  4 blocks for each request sent to it since its last report.
- ``prefix_cache_aware``: the instance maximising
  ``score = hit_blocks / prompt_blocks - balance * queue / max_num_seqs``, where
  ``hit_blocks`` is the depth of the prompt's deepest full block the instance holds (the
  global prefix index; a block's hash chains its parents', so holding it means holding
  the prefix up to it, unless a parent alone was evicted: the index is a hint) and
  ``queue`` its waiting + running + just-sent requests. The cache term is at most 1, so
  once an instance holds a full batch more than another (``balance`` = 1), no cache hit
  keeps traffic on it: one hot instance cannot take everything.

  A decision walks the prompt's blocks from the deepest and stops as soon as no shallower
  hit can beat the best score so far (even on the least loaded instance); among many
  holders of one block (a shared system prompt) it takes the least loaded one straight
  from the load order. So it costs about the prompt's length, not the number of instances.
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

    def __init__(self, index: PrefixIndex, balance: float = 1.0) -> None:
        self.index = index
        self.balance = balance

    def choose(self, req: TokenizedRequest, registry: Registry) -> InstanceState | None:
        least = registry.least_loaded()
        if least is None:
            return None
        hashes, holders_of, balance = req.block_hashes, self.index.holders, self.balance
        n = max(len(hashes), 1)
        floor = balance * least.load_fraction  # no instance pays a smaller load term
        best, best_score = least, -floor
        seen: set[str] = set()
        many = max(8, len(registry) // 8)  # holders beyond this: pick from the load order
        for depth in range(len(hashes), 0, -1):
            if depth / n - floor <= best_score:
                break  # nothing at this depth or shallower can win
            holders = holders_of.get(hashes[depth - 1])
            if not holders:
                continue
            if len(holders) > many:
                pick = registry.least_loaded_of(holders)
                candidates = (pick,) if pick is not None else ()
            else:
                candidates = [registry.instances.get(i) for i in holders if i not in seen]
            for inst in candidates:
                if inst is None:
                    continue
                seen.add(inst.id)
                score = depth / n - balance * inst.load_fraction
                if score > best_score:
                    best, best_score = inst, score
        return best


def make_policy(name: str, index: PrefixIndex):
    """The policy called ``name`` (one of ``POLICIES``)."""
    if name == "round_robin":
        return RoundRobin()
    if name == "kv_cache_aware":
        return KVCacheAware()
    if name == "prefix_cache_aware":
        return PrefixCacheAware(index)
    raise ValueError(f"router policy must be one of {', '.join(POLICIES)}; got {name!r}")
