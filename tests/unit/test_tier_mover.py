"""The KV agent's side of the tiers: the disk tier's files and checks, and the mover that
runs tier orders over a real shared pool, host memory and disk, in order and gated on the
workers' progress."""

from __future__ import annotations

import os

import numpy as np
import pytest

from xllm.block_hash import ROOT_HASH, hash_block
from xllm.kv_transfer.disk_tier import DiskTier
from xllm.kv_transfer.host_tier import HostTier
from xllm.kv_transfer.pool import SharedKVPool
from xllm.kv_transfer.tier_mover import LOAD_LOOK_S, LOOK_S, STORE_LOOK_S, TierMover
from xllm.protocol import KVTierOp, KVTierOrder

LAYERS, BLOCKS, BB, BS = 3, 8, 32, 4
LAYOUT = {"format": 1, "model": "m", "dtype": "float32", "block_size": BS, "ranks": 1, "layers": LAYERS,
          "block_bytes": BB}


def block(tokens, parent=ROOT_HASH):
    return hash_block(parent, tokens), parent, list(tokens)


@pytest.fixture
def pool(tmp_path):
    p = SharedKVPool.create(tmp_path / "pool", LAYERS, BLOCKS, BB)
    for b in range(BLOCKS):  # every byte of a block names its block, layer and K or V
        for layer in range(LAYERS):
            p.data[layer, 0, b] = 10 * b + layer
            p.data[layer, 1, b] = 100 + 10 * b + layer
    yield p
    p.close()


def run_step(pool, step):
    """The worker's publications for one whole step."""
    pool.start_step(step)
    pool.layer_done(LAYERS)


def store(h, parent, tokens, device_block, slot):
    return KVTierOp("store", h, slot, device_block, parent, tokens)


# -- the disk tier -------------------------------------------------------------------------------


def test_a_block_file_reads_back_only_while_it_is_intact(tmp_path):
    disk = DiskTier(tmp_path / "d", LAYOUT)
    data = np.random.default_rng(0).integers(0, 255, (1, LAYERS, 2, BB), dtype=np.uint8)
    h, parent, tokens = block([1, 2, 3, 4])
    disk.write(h, parent, tokens, data)
    out = np.zeros_like(data)
    assert disk.read(h, out) == ("", parent, tuple(tokens)) and np.array_equal(out, data)
    raw = bytearray(disk.path(h).read_bytes())
    raw[-5] ^= 0x40  # one bit of K/V flips on disk
    disk.path(h).write_bytes(bytes(raw))
    problem, _, _ = disk.read(h, out)
    assert "checksum" in problem and not disk.path(h).exists()  # detected, and gone


def test_a_file_whose_tokens_do_not_make_its_hash_is_refused(tmp_path):
    disk = DiskTier(tmp_path / "d", LAYOUT)
    data = np.zeros((1, LAYERS, 2, BB), dtype=np.uint8)
    h, parent, _ = block([1, 2, 3, 4])
    disk.write(h, parent, [9, 9, 9, 9], data)  # a consistent checksum over the wrong tokens
    assert "hash" in disk.read(h, data)[0]
    other, _, _ = block([5, 6, 7, 8])
    disk.write(other, parent, [5, 6, 7, 8], data)
    os.replace(disk.path(other), disk.path(h))  # a file under another block's name
    assert "holds block" in disk.read(h, data)[0]
    assert "cannot read" in disk.read(12345, data)[0]


def test_a_scan_finds_the_blocks_oldest_first_and_a_new_layout_starts_empty(tmp_path):
    disk = DiskTier(tmp_path / "d", LAYOUT)
    data = np.zeros((1, LAYERS, 2, BB), dtype=np.uint8)
    first, second = block([1, 2, 3, 4]), block([5, 6, 7, 8])
    second = block([5, 6, 7, 8], first[0])
    for h, parent, tokens in (second, first):
        disk.write(h, parent, tokens, data)
    os.utime(disk.path(second[0]), (1, 1))  # the older one
    (tmp_path / "d" / "x.tmp").write_bytes(b"half a write")
    (tmp_path / "d" / "0000000000000001.kvb").write_bytes(b"junk")
    again = DiskTier(tmp_path / "d", LAYOUT)  # a restart: same layout
    assert again.scan() == [(second[0], second[1], tuple(second[2])), (first[0], first[1], tuple(first[2]))]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        ["layout.json", disk.path(first[0]).name, disk.path(second[0]).name])
    other = DiskTier(tmp_path / "d", {**LAYOUT, "model": "another"})
    assert other.scan() == []


# -- the mover -----------------------------------------------------------------------------------


def test_stores_wait_for_their_step_and_loads_are_written_while_theirs_runs(pool):
    host = HostTier(4, [pool])
    mover = TierMover([pool], host, None, BS)
    h, parent, tokens = block([1, 2, 3, 4])
    assert mover.accept(KVTierOrder(1, 1, [store(h, parent, tokens, 2, 3)])) == ""
    pool.start_step(1)
    pool.layer_done(LAYERS - 1)
    assert mover.advance() == [] and not host.holds(3, h)  # step 1 has not stored its last layer
    pool.layer_done(LAYERS)
    (done,) = mover.advance()
    assert done.job_id == 1 and done.failed == [] and host.holds(3, h)
    assert mover.accept(KVTierOrder(2, 3, [KVTierOp("load", h, 3, 6)])) == ""
    run_step(pool, 2)
    assert mover.advance() == [] and not pool.loaded(3, 0)  # step 3 has not started
    pool.start_step(3)
    (done,) = mover.advance()
    assert all(pool.loaded(3, layer) for layer in range(LAYERS)) and not pool.loaded(4, 0)
    for layer in range(LAYERS):
        assert (pool.data[layer, 0, 6] == 20 + layer).all() and (pool.data[layer, 1, 6] == 120 + layer).all()


def test_the_agent_looks_finely_only_when_a_load_is_about_to_be_needed(pool):
    """The agent shares the cores with the workers: it looks at their progress every
    100 us only once the step before a load's has stored its last layer, every ms while
    that step computes or while a store has a load behind it, rarely for stores alone,
    and not at all with nothing to do."""
    host = HostTier(4, [pool])
    mover = TierMover([pool], host, None, BS)
    assert mover.next_look() is None
    h, parent, tokens = block([1, 2, 3, 4])
    mover.accept(KVTierOrder(1, 1, [store(h, parent, tokens, 2, 3)]))
    pool.start_step(1)
    assert mover.advance() == [] and mover.next_look() == STORE_LOOK_S  # only a store waits
    mover.accept(KVTierOrder(2, 2, [KVTierOp("load", h, 3, 6)]))
    assert mover.next_look() == LOOK_S  # a load waits behind the store
    pool.layer_done(LAYERS)
    assert [d.job_id for d in mover.advance()] == [1]
    assert mover.next_look() == LOAD_LOOK_S  # step 1 stored its last layer: step 2 starts soon
    mover.accept(KVTierOrder(3, 4, [KVTierOp("load", h, 3, 7)]))
    pool.start_step(2)
    assert [d.job_id for d in mover.advance()] == [2]
    assert mover.next_look() == LOOK_S  # step 3 (before the load's step 4) has not even started
    run_step(pool, 3)
    assert mover.next_look() == LOAD_LOOK_S
    pool.start_step(4)
    assert [d.job_id for d in mover.advance()] == [3] and mover.next_look() is None


def test_orders_run_in_order_so_a_slot_is_spilled_before_it_is_overwritten(pool, tmp_path):
    host = HostTier(1, [pool])
    disk = DiskTier(tmp_path / "d", LAYOUT)
    mover = TierMover([pool], host, disk, BS)
    a, b = block([1, 2, 3, 4]), block([5, 6, 7, 8])
    mover.accept(KVTierOrder(1, 1, [store(*a, 1, 0)]))
    mover.accept(KVTierOrder(2, 2, [KVTierOp("spill", a[0], 0), store(*b, 5, 0)]))
    mover.accept(KVTierOrder(3, 2, [KVTierOp("fetch", a[0], 0)]))  # a comes back up into the slot
    run_step(pool, 1)
    assert [d.job_id for d in mover.advance()] == [1]
    pool.start_step(2)
    assert mover.advance() == [] and disk.path(a[0]).exists()  # spilled; the store waits for step 2
    pool.layer_done(LAYERS)
    assert [d.job_id for d in mover.advance()] == [2, 3]
    assert host.holds(0, a[0]) and (host.data[0, 0, 2, 1] == 112).all()  # block 1's V of layer 2, via disk


def test_a_corrupt_file_fails_its_fetch_and_is_never_loaded(pool, tmp_path):
    host = HostTier(2, [pool])
    disk = DiskTier(tmp_path / "d", LAYOUT)
    mover = TierMover([pool], host, disk, BS)
    a = block([1, 2, 3, 4])
    mover.accept(KVTierOrder(1, 1, [store(*a, 1, 0), KVTierOp("spill", a[0], 0)]))
    run_step(pool, 1)
    mover.advance()
    raw = bytearray(disk.path(a[0]).read_bytes())
    raw[len(raw) // 2] ^= 1
    disk.path(a[0]).write_bytes(bytes(raw))
    mover.accept(KVTierOrder(2, 1, [KVTierOp("fetch", a[0], 1)]))
    (done,) = mover.advance()
    assert done.failed == [a[0]] and not host.holds(1, a[0]) and not disk.path(a[0]).exists()
    mover.accept(KVTierOrder(3, 2, [KVTierOp("load", a[0], 1, 4)]))  # an order that would load it anyway
    pool.start_step(2)
    (done,) = mover.advance()
    assert done.failed == [a[0]] and (pool.data[0, 0, 4] == 40).all()  # block 4 untouched
    assert pool.loaded(2, LAYERS - 1)  # and the workers are not left waiting


@pytest.mark.parametrize("ops, problem", [
    ([KVTierOp("launch", 1)], "unknown op"),
    ([KVTierOp("spill", 1, 0), KVTierOp("load", 1, 0, 1)], "loads must come first"),
    ([KVTierOp("load", 1, 9, 1)], "host slot 9"),
    ([KVTierOp("store", 1, 0, BLOCKS, 0, [1, 2, 3, 4])], "device block"),
    ([KVTierOp("store", 1, 0, 1, 0, [1, 2])], "tokens"),
    ([KVTierOp("drop", 1)], "no disk tier"),
])
def test_a_malformed_order_is_refused_whole(pool, ops, problem):
    mover = TierMover([pool], HostTier(2, [pool]), None, BS)
    assert problem in mover.accept(KVTierOrder(7, 1, ops))
    assert not mover.busy


def test_an_order_for_a_step_far_ahead_or_out_of_sequence_is_refused_and_wedges_nothing(pool):
    mover = TierMover([pool], HostTier(2, [pool]), None, BS)
    h, parent, tokens = block([1, 2, 3, 4])
    assert "far past" in mover.accept(KVTierOrder(1, 10**9, [store(h, parent, tokens, 1, 0)]))
    assert "out of sequence" in mover.accept(KVTierOrder(5, 1, [store(h, parent, tokens, 1, 0)]))
    assert mover.accept(KVTierOrder(1, 1, [store(h, parent, tokens, 1, 0)])) == ""  # the scheduler's
    assert "out of sequence" in mover.accept(KVTierOrder(1, 1, [store(h, parent, tokens, 1, 0)]))  # a replay
    run_step(pool, 1)
    assert [d.job_id for d in mover.advance()] == [1]


def test_a_clean_stop_writes_the_host_tier_to_disk_most_recent_last_to_go(pool, tmp_path):
    host = HostTier(3, [pool])
    disk = DiskTier(tmp_path / "d", LAYOUT)
    mover = TierMover([pool], host, disk, BS)
    a, b = block([1, 2, 3, 4]), block([5, 6, 7, 8])
    mover.accept(KVTierOrder(1, 1, [store(*a, 1, 0), store(*b, 2, 1)]))
    run_step(pool, 1)
    mover.advance()
    mover.accept(KVTierOrder(2, 2, [KVTierOp("load", a[0], 0, 5)]))  # a is used again: the most recent
    pool.start_step(2)
    mover.advance()
    assert mover.flush(5.0) == 2
    restarted = DiskTier(tmp_path / "d", LAYOUT)
    assert [h for h, _, _ in restarted.scan()] == [b[0], a[0]]  # b goes first when the disk is full
    out = np.zeros((1, LAYERS, 2, BB), dtype=np.uint8)
    assert restarted.read(a[0], out)[0] == "" and np.array_equal(out, host.data[0])
