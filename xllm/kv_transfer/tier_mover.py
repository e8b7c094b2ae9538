"""The KV agent's side of the KV tiers: runs its scheduler's tier orders, strictly in order.

An order (``KVTierOrder``) is a list of ops tied to one step (``KVTierOp`` says what each
does). The mover runs the orders one after another and the ops of each in order; an op
that must wait holds back every op after it:

- loads (host -> device) wait until the workers have started the order's step, so no
  earlier step still reads or writes the pool; then every loaded block's layer 0 is
  written, published in the pool header, layer 1, and so on, while the workers compute
  the step (they wait before each attention layer until its blocks are in);
- stores (device -> host) wait until the order's step has stored its KV;
- spills, fetches and drops run at once.

NOTE (invariant): running ops in the scheduler's order is what makes its bookkeeping
true: a slot is read by every op issued before the op that overwrites it, a file is
written before the drop that deletes it. The only other party, the workers, never
touches a device block an unfinished order names: the scheduler holds those blocks
until this mover's ``KVTierDone``, and a load's blocks are written during the one step
that reads them.

Pure computation over the pools and tiers: the agent actor feeds it orders and sends
what ``advance`` returns; unit tests drive it by hand.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from ..protocol import TIER_OPS, KVTierDone, KVTierOrder
from .disk_tier import DiskTier
from .host_tier import HostTier
from .pool import SharedKVPool

log = logging.getLogger(__name__)

MAX_STEPS_AHEAD = 64  # an order for a step this far past the workers' is refused (nothing waits that long)
LOAD_LOOK_S = 100e-6  # how often progress is looked at when a load's step is about to start
LOOK_S = 1e-3  # ... when a load waits for a step still computing, or a store has loads behind it
STORE_LOOK_S = 10e-3  # ... when only stores wait (for their step to store its KV)


@dataclass
class Job:
    order: KVTierOrder
    num_loads: int  # its leading load ops
    next_op: int = 0  # ops before this are done
    failed: list[int] = field(default_factory=list)
    load_seconds: float = 0.0
    fetch_seconds: float = 0.0


class TierMover:
    """Runs tier orders over the instance's pools, its host tier and its disk tier."""

    def __init__(self, pools: list[SharedKVPool], host: HostTier, disk: DiskTier | None, block_size: int) -> None:
        self.pools = pools
        self.host = host
        self.disk = disk
        self.block_size = block_size
        self.jobs: deque[Job] = deque()
        self.next_job = 1  # orders come numbered 1, 2, ... from the scheduler (it starts with this agent)
        self.last_use = [0] * host.num_slots  # per host slot: when an op last stored, loaded or fetched it
        self.clock = 0

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def loads_waiting(self) -> bool:
        """True while the next thing to do is a load waiting for its step to start (the
        workers will wait for it soon: look again quickly)."""
        return bool(self.jobs) and self.jobs[0].next_op < self.jobs[0].num_loads

    def next_look(self) -> float | None:
        """Seconds until the workers' progress is worth looking at again (after
        ``advance``); None when no order waits for it (the next message wakes the agent).

        NOTE: the agent shares the machine with the workers, and every look costs a turn
        of its loop, so it looks finely only where a worker may be waiting: a load is
        written while its step runs and attention waits for it, so once the step before
        has stored its last layer (only sampling is left of it) the agent looks every
        ``LOAD_LOOK_S``; before that, every ``LOOK_S``. A store delays nothing but the
        loads queued behind it (its blocks stay held a little longer), so with none
        queued it is looked at every ``STORE_LOOK_S``."""
        if not self.jobs:
            return None
        job = self.jobs[0]
        if job.next_op < job.num_loads:
            step, layers = self.pools[0].progress()
            before = job.order.step_id - 1
            return LOAD_LOOK_S if step > before or (step == before and layers >= self.pools[0].num_layers) \
                else LOOK_S
        if any(j.num_loads for j in self.jobs):
            return LOOK_S
        return STORE_LOOK_S

    def accept(self, order: KVTierOrder) -> str:
        """Queue ``order``; returns "" or why it is refused (nothing of it is then done)."""
        problem = self._check(order)
        if problem:
            log.error("refused tier order %d: %s", order.job_id, problem)
            return problem
        loads = next((i for i, op in enumerate(order.ops) if op.kind != "load"), len(order.ops))
        self.jobs.append(Job(order, loads))
        self.next_job += 1
        return ""

    def advance(self) -> list[KVTierDone]:
        """Run every op that may run now; the orders finished, as their answers."""
        done = []
        while self.jobs and self._run(self.jobs[0]):
            job = self.jobs.popleft()
            done.append(KVTierDone(job.order.job_id, job.failed, job.load_seconds, job.fetch_seconds))
        return done

    # -- running -------------------------------------------------------------------------
    def _run(self, job: Job) -> bool:
        """Run ``job``'s ops as far as they may go now; True once all are done."""
        ops, step = job.order.ops, job.order.step_id
        if job.next_op < job.num_loads:
            if not all(p.started(step) for p in self.pools):
                return False
            self._load(job)
            job.next_op = job.num_loads
        last_layer = self.pools[0].num_layers - 1
        while job.next_op < len(ops):
            op = ops[job.next_op]
            if op.kind == "store" and not all(p.written(step, last_layer) for p in self.pools):
                return False
            getattr(self, f"_{op.kind}")(op, job)
            job.next_op += 1
        return True

    def _load(self, job: Job) -> None:
        """Write the job's loaded blocks layer by layer, publishing each layer."""
        t0 = time.perf_counter()
        step = job.order.step_id
        slots, blocks = [], []
        for op in job.order.ops[:job.num_loads]:
            if self.host.holds(op.host_slot, op.block_hash):
                slots.append(op.host_slot)
                blocks.append(op.device_block)
                self._used(op.host_slot)
            else:  # the scheduler's bookkeeping and this memory disagree: a bug, said loudly
                log.error("tier order %d: host slot %d does not hold block %016x; not loaded",
                          job.order.job_id, op.host_slot, op.block_hash)
                job.failed.append(op.block_hash)
        for pool in self.pools:
            pool.start_load(step)
        for layer in range(self.pools[0].num_layers):
            if slots:
                self.host.load_layer_into(self.pools, layer, slots, blocks)
            for pool in self.pools:
                pool.load_done(layer + 1)
        job.load_seconds = time.perf_counter() - t0

    def _store(self, op, job: Job) -> None:
        self.host.store_from(self.pools, op.device_block, op.host_slot)
        self.host.name(op.host_slot, op.block_hash, op.parent_hash, op.token_ids)
        self._used(op.host_slot)

    def _spill(self, op, job: Job) -> None:
        name = self.host.names[op.host_slot]
        if name is None or name[0] != op.block_hash:
            log.error("tier order %d: host slot %d does not hold block %016x; not spilled",
                      job.order.job_id, op.host_slot, op.block_hash)
            return
        self.disk.write(op.block_hash, name[1], name[2], self.host.data[op.host_slot])

    def _fetch(self, op, job: Job) -> None:
        t0 = time.perf_counter()
        problem, parent, tokens = self.disk.read(op.block_hash, self.host.data[op.host_slot])
        job.fetch_seconds += time.perf_counter() - t0
        if problem:
            self.host.forget(op.host_slot)
            job.failed.append(op.block_hash)
        else:
            self.host.name(op.host_slot, op.block_hash, parent, tokens)
            self._used(op.host_slot)

    def _drop(self, op, job: Job) -> None:
        self.disk.delete(op.block_hash)

    def _used(self, slot: int) -> None:
        self.clock += 1
        self.last_use[slot] = self.clock

    # -- a clean stop --------------------------------------------------------------------
    def flush(self, seconds: float) -> int:
        """Write the host tier's blocks that the disk tier lacks to disk, most recently used
        first, for at most ``seconds`` (a clean stop: a restarted instance finds them).
        Their files' ages keep the order of use. Returns how many were written."""
        if self.disk is None:
            return 0
        deadline = time.monotonic() + seconds
        written = []
        for slot in sorted(range(self.host.num_slots), key=lambda s: -self.last_use[s]):
            name = self.host.names[slot]
            if name is None or time.monotonic() > deadline:
                continue
            path = self.disk.path(name[0])
            if not path.exists():
                self.disk.write(name[0], name[1], name[2], self.host.data[slot])
            written.append(path)
        now = time.time()
        for age, path in enumerate(written):  # most recent last to be evicted after a restart
            os.utime(path, (now - age * 1e-3, now - age * 1e-3))
        return len(written)

    # -- checks --------------------------------------------------------------------------
    def _check(self, order: KVTierOrder) -> str:
        kinds = [op.kind for op in order.ops]
        if any(k not in TIER_OPS for k in kinds):
            return f"unknown op {next(k for k in kinds if k not in TIER_OPS)!r}"
        leading = next((i for i, k in enumerate(kinds) if k != "load"), len(kinds))
        if "load" in kinds[leading:]:
            return "loads must come first"
        gated = any(k in ("load", "store") for k in kinds)
        if gated and order.step_id > int(self.pools[0].progress()[0]) + MAX_STEPS_AHEAD:
            return f"step {order.step_id} is far past the workers'"
        if self.disk is None and any(k in ("spill", "fetch", "drop") for k in kinds):
            return "this instance has no disk tier"
        num_blocks = self.pools[0].num_blocks
        for op in order.ops:
            if op.kind != "drop" and not 0 <= op.host_slot < self.host.num_slots:
                return f"host slot {op.host_slot} (the host tier has {self.host.num_slots})"
            if op.kind in ("load", "store") and not 0 <= op.device_block < num_blocks:
                return f"device block {op.device_block} (the pool has {num_blocks})"
            if op.kind == "store" and len(op.token_ids) != self.block_size:
                return f"a stored block of {len(op.token_ids)} tokens (blocks hold {self.block_size})"
        if order.job_id != self.next_job:
            return f"order {order.job_id} out of sequence (the next is {self.next_job}): not the scheduler's"
        return ""
