"""KV tiers end to end without a model: the real scheduler, the real agent side (mover, host
memory, disk files in a temporary directory) over a real shared pool, and a stand-in worker
whose KV is a known function of each token's prefix, so every byte attention would read
can be checked. Random workloads with tiny tiers, random delays in the agent's answers and
random corruption of disk files:

- the integrity check holds in every tier after every step (device references are
  exactly the requests' and the agent's; every host slot and disk file is owned once);
- every block a tier holds has the right bytes, and no step reads a wrong byte: a block
  that comes back from host or disk is the block that went down, and a corrupted file is
  detected and recomputed, never served.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.block_hash import block_hashes
from xllm.config import CacheConfig, SchedulerConfig
from xllm.kv_transfer.disk_tier import DiskTier
from xllm.kv_transfer.host_tier import HostTier
from xllm.kv_transfer.pool import SharedKVPool
from xllm.kv_transfer.tier_mover import TierMover
from xllm.protocol import SamplingParams, StepPlan, StepResult, TokenizedRequest
from xllm.scheduler.scheduler import Scheduler

from tests.unit.fake_worker import FakeWorker

BS, LAYERS, DEVICE, HOST, DISK = 4, 2, 12, 5, 9
PREFIXES = [[(p * 37 + i * 11) % 97 + 1 for i in range(16)] for p in range(3)]


def kv(tokens: list[int], pos: int, layer: int, which: int) -> int:
    """The K (0) or V (1) value the stand-in model computes at ``pos``: a function of the
    tokens up to it, as a real model's is."""
    return (hash(tuple(tokens[:pos + 1])) ^ (layer << 40) ^ (which << 50)) & (2**62 - 1)


class KVWorker(FakeWorker):
    """``FakeWorker`` that also writes and reads its requests' KV in the shared pool: before
    a step it checks every cached position the step attends to, then writes the new ones."""

    def __init__(self, pool: SharedKVPool) -> None:
        super().__init__()
        self.pool = pool
        self.blocks: dict[str, list[int]] = {}
        self.expected: dict[int, np.ndarray] = {}  # block hash -> its (layers, 2, BS) values

    def view(self, layer: int, which: int) -> np.ndarray:
        return self.pool.data[layer, which].view(np.int64)  # (blocks, BS)

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_req_ids:
            self.blocks.pop(rid, None)
        for new in plan.new_requests:
            self.blocks[new.req_id] = list(new.block_ids)
        for rid, blocks in plan.new_block_ids.items():
            self.blocks[rid].extend(blocks)
        self.pool.start_step(plan.step_id)
        for rid, n, c in zip(plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed):
            tokens = self.tokens[rid] if rid in self.tokens else next(
                r.token_ids for r in plan.new_requests if r.req_id == rid)
            self._check(rid, tokens, c)
            self._write(rid, tokens, c, c + n)
        self.pool.layer_done(LAYERS)
        return super().execute(plan)

    def _check(self, rid: str, tokens: list[int], upto: int) -> None:
        for pos in range(upto):
            b = self.blocks[rid][pos // BS]
            for layer in range(LAYERS):
                for which in (0, 1):
                    got = int(self.view(layer, which)[b, pos % BS])
                    assert got == kv(tokens, pos, layer, which), f"{rid} reads a wrong KV at position {pos}"

    def _write(self, rid: str, tokens: list[int], start: int, end: int) -> None:
        for pos in range(start, min(end, len(tokens))):
            b = self.blocks[rid][pos // BS]
            for layer in range(LAYERS):
                for which in (0, 1):
                    self.view(layer, which)[b, pos % BS] = kv(tokens, pos, layer, which)
        hashes = block_hashes(tokens[:min(end, len(tokens))], BS)
        for i, h in enumerate(hashes):
            self.expected[h] = np.array([[[kv(tokens, i * BS + o, layer, which) for o in range(BS)]
                                          for which in (0, 1)] for layer in range(LAYERS)], dtype=np.int64)


# a workload is rounds of: new requests (which shared prefix, how much of it, output length),
# steps, agent answers let through, and now and then a corrupted disk file
rounds = st.lists(st.tuples(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 14), st.integers(1, 6)), max_size=3),
    st.integers(1, 4), st.integers(0, 3), st.none() | st.integers(0, 10**6),
), min_size=6, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=rounds, lazy=st.booleans())
def test_tiers_keep_every_block_and_never_serve_a_wrong_one(tmp_path_factory, workload, lazy):
    """``lazy``: the agent runs a step's stores only when the next step starts (a slow agent:
    the scheduler has planned, and the workers run, the next step before it copies)."""
    tmp = tmp_path_factory.mktemp("tiers")
    pool = SharedKVPool.create(tmp / "pool", LAYERS, DEVICE + 1, BS * 8)
    try:
        Run(tmp, pool, lazy).play(workload)
    finally:
        pool.close()


class Run:
    """One workload: the scheduler, its agent's mover, the stand-in worker."""

    def __init__(self, tmp, pool: SharedKVPool, lazy: bool = False) -> None:
        self.lazy = lazy
        cache = CacheConfig(block_size=BS, num_blocks=DEVICE, host_blocks=HOST, disk_blocks=DISK,
                            disk_dir=str(tmp / "disk"))
        self.s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12), cache, 48)
        layout = {"format": 1, "model": "m", "dtype": "x", "block_size": BS, "ranks": 1, "layers": LAYERS,
                  "block_bytes": BS * 8}
        self.disk = DiskTier(tmp / "disk", layout)
        self.host = HostTier(HOST, [pool])
        self.mover = TierMover([pool], self.host, self.disk, BS)
        self.worker = KVWorker(pool)
        self.answers: deque = deque()  # the agent's answers, delivered late on purpose
        self.n = 0

    def play(self, workload) -> None:
        for adds, steps, answers, corrupt in workload:
            for add in adds:
                self.add(*add)
            self.step(steps)
            self.answer(answers)
            if corrupt is not None:
                self.corrupt(corrupt)
        self.lazy = False
        for _ in range(300):  # then let everything finish
            self.answers += self.mover.advance()
            self.answer(len(self.answers))
            if not self.s.requests and not self.s.tiers.jobs:
                break
            self.step(1)
        assert not self.s.requests and not self.s.tiers.jobs
        counts = self.s.check_integrity()
        assert counts["used"] == 0 and counts["agent_held"] == 0

    def add(self, prefix: int, tail: int, max_tokens: int) -> None:
        self.n += 1
        tokens = PREFIXES[prefix][: 4 + tail] + [self.n % 50 + 200]
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        self.s.add_request(TokenizedRequest(f"r{self.n}", tokens, sp, [], float(self.n)))

    def step(self, count: int) -> None:
        for _ in range(count):
            plan = self.s.schedule()
            for order in self.s.take_tier_orders():
                assert self.mover.accept(order) == ""
            if plan is not None:
                self.worker.pool.start_step(plan.step_id)
                if plan.loads_kv or not self.lazy:  # the workers wait for loads
                    self.answers += self.mover.advance()  # (the last step's stores), its loads
                result = self.worker.execute(plan)
                if not self.lazy:
                    self.answers += self.mover.advance()  # its stores, once it is done
                self.s.update(result)
            elif not self.lazy:
                self.answers += self.mover.advance()
            self.check()

    def answer(self, count: int) -> None:
        for _ in range(min(count, len(self.answers))):
            self.s.tier_done(self.answers.popleft())
        self.check()

    def corrupt(self, seed: int) -> None:
        files = sorted(self.disk.root.glob("*.kvb"))
        if files:
            rng = random.Random(seed)
            path = files[rng.randrange(len(files))]
            raw = bytearray(path.read_bytes())
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(raw))

    def check(self) -> None:
        self.s.check_integrity()
        if self.mover.busy:
            return  # the tiers' bytes are what the bookkeeping says once the agent has caught up
        tiers = self.s.tiers
        for h, entry in tiers.host.entries.items():  # a ready host block holds its very bytes
            if entry.ready:
                assert self.host.holds(entry.slot, h)
                got = self.host.data[entry.slot, 0].view(np.int64).reshape(LAYERS, 2, BS)
                assert np.array_equal(got, self.worker.expected[h]), "a host slot holds the wrong block"
        files = {int(p.stem, 16) for p in self.disk.root.glob("*.kvb")}
        assert files <= set(tiers.disk.entries), "a disk file nobody knows of"
        failing = {h for done in self.answers for h in done.failed}  # files found bad, not yet heard of
        assert set(tiers.disk.entries) - files <= failing, "a disk block lost its file"
        assert len(files) <= DISK
