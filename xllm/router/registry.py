"""The router's view of the instances: who is there, where, and how loaded.

Entries come from the metadata store (or, for a deployment of one host, from its plan);
loads come from each instance's ``InstanceLoad`` reports, and between two reports the
router counts the requests it sent there (``pending``, and their prompts' blocks) so a
burst does not all land on the instance that looked idlest half a second ago.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

from ..perf_model import NOMINAL, ServiceModel
from ..protocol import InstanceLoad


@dataclass
class InstanceState:
    """One registered instance."""

    id: str
    address: str  # its scheduler's input
    incarnation: str = ""  # "" until it is known (from the store or a first report)
    role: str = "mixed"
    next_role: str = ""  # the role it drains towards: no new work meanwhile ("": none)
    num_blocks: int = 1
    block_size: int = 16
    max_num_seqs: int = 64
    load: InstanceLoad | None = None
    model: ServiceModel | None = None  # its measured service times (None until its record has them)
    pending: int = 0  # requests sent to it since its last load report
    pending_blocks: int = 0  # the prefill they bring (their prompts' blocks it does not hold)
    last_report: float = field(default_factory=time.monotonic)

    @property
    def work(self) -> float:
        """The work queued in it, in KV blocks of prefill: its waiting requests' blocks and
        the prefill of those sent since its last report, plus ``running_weight`` for each
        running or just-sent request."""
        waiting = self.load.num_waiting_blocks if self.load else 0
        return waiting + self.pending_blocks + self.running_weight * self.decode_batch

    @property
    def running_weight(self) -> float:
        """What one running request costs it, in blocks of prefill: the decode time it adds
        over the rest of its output, ``(d1 + d2·c)·n/2`` seconds (``c`` its share of the
        instance's context, ``n`` the mean output the instance reports finishing: half of it
        is left on average), over the prefill seconds of one block of a 1,024-token prompt.
        1 until the profile and a mean output are known.

        NOTE: counting a running request as one block let a popular system prompt's holders
        take conversations until their queues outgrew the prefix (about 30 blocks of extra
        running requests): at 100 and 1,000 simulated instances their decode batches filled
        and half the requests missed the TPOT target (``bench.sim``, RESULTS "Router at scale")."""
        out = self.load.mean_output_tokens if self.load else 0.0
        m = self.model
        if m is None or not 0 < out < MAX_OUTPUT_TOKENS:  # NaN too: it would break the load order
            return 1.0
        batch = self.decode_batch
        per_step = m.d1 + (m.d2 * self.context_tokens / batch if batch else 0.0)
        block_s = m.prefill_s(1024) * self.block_size / 1024
        return max(1.0, per_step * out / 2 / block_s) if block_s > 0 else 1.0

    @property
    def free_blocks(self) -> int:
        """Free KV blocks as last reported (all of them before any report)."""
        return self.load.num_free_blocks if self.load else self.num_blocks

    @property
    def service(self) -> ServiceModel:
        """Its service-time model (a nominal one until its profile is known)."""
        return self.model if self.model is not None else _NOMINAL

    @property
    def prefill_backlog_s(self) -> float:
        """Predicted seconds of prefill queued in it: its waiting requests' prompts, the
        prefill of those sent since its last report, and what is left of the prompts it is
        computing.

        NOTE: leaving out the prefill in progress made an instance busy with a long prompt
        (a step of seconds) look idle: ``slo_aware`` kept sending it work (``bench.sim``)."""
        load = self.load
        waiting, blocks, left = (load.num_waiting, load.num_waiting_blocks, load.num_prefill_tokens) if load else (0, 0, 0)
        m = self.service
        return m.backlog_s(waiting + self.pending, (blocks + self.pending_blocks) * self.block_size) + (
            m.prefill_tokens_s(max(left, 0)))  # a report's count, not trusted to be sane

    @property
    def decode_batch(self) -> int:
        """Requests it decodes (or will) by now: running as reported, plus those sent since."""
        return (self.load.num_running if self.load else 0) + self.pending

    @property
    def joining(self) -> int:
        """Requests waiting in it (as last reported): its decode batch once they start."""
        return self.load.num_waiting if self.load else 0

    @property
    def joining_tokens(self) -> int:
        """Context the waiting and the just-sent requests bring (their prompts, in blocks)."""
        return ((self.load.num_waiting_blocks if self.load else 0) + self.pending_blocks) * self.block_size

    @property
    def context_tokens(self) -> int:
        """Tokens of KV its requests hold, as last reported (its used blocks, full)."""
        return (self.num_blocks - self.free_blocks) * self.block_size

    @property
    def decode_step_s(self) -> float:
        """Predicted seconds of its decode step now."""
        return self.service.decode_step_s(self.decode_batch, self.context_tokens)


_NOMINAL = ServiceModel(NOMINAL)
MAX_OUTPUT_TOKENS = 1 << 20  # a reported mean output past this (or NaN) is not believed


class _Ordered:
    """The instances sorted by ``key`` at any time (a sorted list: O(log n) search plus a
    memmove per change), so the least loaded instance of any subset is found by walking
    from the front."""

    def __init__(self, key: Callable[[InstanceState], float]) -> None:
        self.key = key
        self.entries: list[tuple[float, str]] = []
        self.current: dict[str, tuple[float, str]] = {}

    def update(self, inst: InstanceState) -> None:
        self.remove(inst.id)
        entry = (self.key(inst), inst.id)
        self.current[inst.id] = entry
        bisect.insort(self.entries, entry)

    def remove(self, instance_id: str) -> None:
        entry = self.current.pop(instance_id, None)
        if entry is not None:
            del self.entries[bisect.bisect_left(self.entries, entry)]

    def first(self) -> str | None:
        return self.entries[0][1] if self.entries else None

    def first_of(self, ids: Collection[str]) -> str | None:
        """The first of ``ids`` in order: quick when they are many (a few steps from the front)."""
        for _, iid in self.entries:
            if iid in ids:
                return iid
        return None


class Registry:
    """The instances requests may go to. Verbs: add, remove, report, routed, least_loaded."""

    def __init__(self) -> None:
        self.instances: dict[str, InstanceState] = {}
        self._by_load = _Ordered(lambda i: i.work)
        self._by_free = _Ordered(lambda i: -(i.free_blocks - i.pending_blocks) / max(i.num_blocks, 1))
        self._by_backlog = _Ordered(lambda i: i.prefill_backlog_s)
        self._by_step = _Ordered(lambda i: i.decode_step_s)

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, instance_id: str) -> InstanceState | None:
        return self.instances.get(instance_id)

    def add(self, inst: InstanceState) -> None:
        """Register (or re-register) an instance."""
        self.instances[inst.id] = inst
        self._rerank(inst)

    def remove(self, instance_id: str) -> InstanceState | None:
        for order in (self._by_load, self._by_free, self._by_backlog, self._by_step):
            order.remove(instance_id)
        return self.instances.pop(instance_id, None)

    def report(self, load: InstanceLoad) -> InstanceState | None:
        """Fold in a load report; None when the instance is not registered."""
        inst = self.instances.get(load.instance_id)
        if inst is None:
            return None
        inst.load, inst.pending, inst.pending_blocks, inst.last_report = load, 0, 0, time.monotonic()
        self._rerank(inst)
        return inst

    def routed(self, inst: InstanceState, blocks: float = 0) -> None:
        """A request was just sent to ``inst``; ``blocks``: the prefill it brings there."""
        inst.pending += 1
        inst.pending_blocks += blocks
        self._rerank(inst)

    def least_loaded(self) -> InstanceState | None:
        iid = self._by_load.first()
        return self.instances[iid] if iid is not None else None

    def least_loaded_of(self, ids: Collection[str]) -> InstanceState | None:
        """The least loaded of ``ids``; meant for a large share of the registry (it walks
        the instances in load order until one is in ``ids``)."""
        iid = self._by_load.first_of(ids)
        return self.instances[iid] if iid is not None else None

    def most_free(self) -> InstanceState | None:
        iid = self._by_free.first()
        return self.instances[iid] if iid is not None else None

    def by_backlog(self) -> Iterator[tuple[float, InstanceState]]:
        """(prefill backlog seconds, instance), least first."""
        for key, iid in self._by_backlog.entries:
            yield key, self.instances[iid]

    def by_decode_step(self) -> Iterator[tuple[float, InstanceState]]:
        """(decode step seconds now, instance), quickest first."""
        for key, iid in self._by_step.entries:
            yield key, self.instances[iid]

    def silent(self, limit_s: float) -> list[InstanceState]:
        """Instances whose last report is older than ``limit_s`` seconds."""
        now = time.monotonic()
        return [i for i in self.instances.values() if now - i.last_report > limit_s]

    def _rerank(self, inst: InstanceState) -> None:
        for order in (self._by_load, self._by_free, self._by_backlog, self._by_step):
            order.update(inst)


DRAINING = "draining"  # the pool of instances changing role: no policy chooses from it
STOPPING = "stop"  # the next role of a drained instance (its requests moved away; it may be stopped)


class Registries:
    """The instances by role (``mixed``, ``prefill``, ``decode``), one ``Registry`` each,
    behind the same verbs; ``pool(role)`` is what a policy chooses from. An instance that
    is changing role (``next_role``) sits in the ``draining`` pool until it has switched."""

    def __init__(self) -> None:
        self.pools: dict[str, Registry] = {}
        self.role_of: dict[str, str] = {}  # instance -> the pool it is in

    def pool(self, role: str) -> Registry:
        pool = self.pools.get(role)
        if pool is None:
            pool = self.pools[role] = Registry()
        return pool

    def __len__(self) -> int:
        return len(self.role_of)

    @property
    def instances(self) -> dict[str, InstanceState]:
        return {iid: inst for pool in self.pools.values() for iid, inst in pool.instances.items()}

    def get(self, instance_id: str) -> InstanceState | None:
        role = self.role_of.get(instance_id)
        return self.pools[role].get(instance_id) if role is not None else None

    def add(self, inst: InstanceState) -> None:
        """Register an instance, or move it to the pool its role (or change) says."""
        where = DRAINING if inst.next_role else inst.role
        old = self.role_of.get(inst.id)
        if old is not None and old != where:  # it came back in another role, or is changing it
            self.pools[old].remove(inst.id)
        self.role_of[inst.id] = where
        self.pool(where).add(inst)

    def set_role(self, instance_id: str, role: str, next_role: str = "") -> InstanceState | None:
        """``instance_id`` now has ``role`` and drains towards ``next_role`` ("": settled);
        its load view is kept. None if it is not registered."""
        inst = self.get(instance_id)
        if inst is not None and (inst.role, inst.next_role) != (role, next_role):
            inst.role, inst.next_role = role, next_role
            self.add(inst)
        return inst

    def remove(self, instance_id: str) -> InstanceState | None:
        role = self.role_of.pop(instance_id, None)
        return self.pools[role].remove(instance_id) if role is not None else None

    def report(self, load: InstanceLoad) -> InstanceState | None:
        role = self.role_of.get(load.instance_id)
        return self.pools[role].report(load) if role is not None else None

    def routed(self, inst: InstanceState, blocks: float = 0) -> None:
        self.pools[self.role_of[inst.id]].routed(inst, blocks)

    def silent(self, limit_s: float) -> list[InstanceState]:
        return [i for pool in self.pools.values() for i in pool.silent(limit_s)]


def placement(pools: Registries, prompt_len: int, short_prompt: int = 0) -> str:
    """Where a request of ``prompt_len`` tokens goes: "pair" (split over a prefill and a
    decode instance), or the role of the pool one instance is chosen from. A short prompt
    (at most ``short_prompt`` tokens) skips the prefill side: a mixed instance, else a
    decode instance computes it. Without a pair: a mixed instance, else one that can
    compute the prompt alone."""
    mixed, prefill, decode = (len(pools.pool(r)) for r in ("mixed", "prefill", "decode"))
    if prompt_len <= short_prompt and (mixed or decode):
        return "mixed" if mixed else "decode"
    if prefill and decode:
        return "pair"
    return "mixed" if mixed else "decode" if decode else "prefill"
