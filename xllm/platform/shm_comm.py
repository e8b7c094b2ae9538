"""Collectives between the tensor-parallel ranks of one host, through shared memory.

Gloo moves every all-reduce over loopback TCP and its own threads: about 0.3–0.9 ms for
a decode step's hidden state on the 2-core test VM, against a few microseconds of
arithmetic. Ranks on one host can instead share one memory segment:

- each rank has a ring of ``SLOTS`` data slots and a flag holding the number of the
  last collective it published;
- collective ``n``: copy this rank's tensor into its slot ``n % SLOTS``, publish ``n``,
  wait until every peer has published ``n``, then sum the slots in rank order (so every
  rank gets the same bits) or concatenate them (all-gather).

Why four slots are enough: a rank may have at most two collectives in flight (micro-batch
overlap keeps one per micro-batch; ``publish`` enforces it), so it publishes ``n`` only
after it finished reading ``n - 2``, which needed every peer to publish ``n - 2``; and a
peer published ``n - 2`` only after it finished reading ``n - 4``, the slot's previous
use. x86 keeps stores in order, so a published flag means the data before it is visible.
Waiting spins briefly, then yields the core (on a small machine the peer may need it).
Tensors larger than a slot go through the process group instead.

Untested beyond CPU ranks on one Linux host (the only setting ``xllm-launch`` creates).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from pathlib import Path

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")  # tmpfs on Linux
SLOTS = 4
FLAG_STRIDE = 8  # int64 per flag: one 64-byte cache line each, no false sharing
WAIT_TIMEOUT_S = 120.0


class PeerTimeout(RuntimeError):
    """A peer rank did not reach a collective in time (it died or hangs)."""


class ShmCommunicator:
    """Shared-memory all-reduce and all-gather for ``size`` ranks of one host."""

    def __init__(self, key: str, rank: int, size: int, slot_bytes: int, barrier, fallback=None) -> None:
        """``barrier()`` synchronizes the ranks (the process group's barrier): rank 0
        creates the segment, the others attach, then it is unlinked (it lives while mapped).
        ``fallback`` (a ``ProcessGroupComm``) takes tensors larger than a slot, and broadcasts."""
        self.rank, self.size, self.fallback = rank, size, fallback
        self.slot_bytes = slot_bytes - slot_bytes % 64
        flags_bytes = size * FLAG_STRIDE * 8
        total = flags_bytes + SLOTS * size * self.slot_bytes
        path = SHM_DIR / ("xllm-tp-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest())
        if rank == 0:
            with open(path, "w+b") as f:  # a fresh file, even over a stale one
                f.truncate(total)
            barrier()
        else:
            barrier()
        with open(path, "r+b") as f:
            self.buf = mmap.mmap(f.fileno(), total)
        barrier()
        if rank == 0:
            path.unlink()  # the mapping stays until every rank exits: nothing to clean up later
        self.flags = np.ndarray((size * FLAG_STRIDE,), dtype=np.int64, buffer=self.buf)
        self.data = torch.frombuffer(self.buf, dtype=torch.uint8, offset=flags_bytes,
                                     count=SLOTS * size * self.slot_bytes)
        self.seq = 0
        self.in_flight: set[int] = set()  # published, not yet read back
        if rank == 0:
            self.flags[:] = 0
        barrier()

    @staticmethod
    def available() -> bool:
        return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.slot_bytes and x.device.type == "cpu"

    def _slot(self, seq: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = ((seq % SLOTS) * self.size + rank) * self.slot_bytes
        n = like.numel() * like.element_size()
        return self.data[start:start + n].view(like.dtype).view(like.shape)

    def publish(self, x: torch.Tensor) -> int:
        """Put this rank's ``x`` in its slot and announce it; returns the collective's number."""
        if any(s <= self.seq - 1 for s in self.in_flight):
            raise RuntimeError("more than two shared-memory collectives in flight: the slot ring would "
                               "overwrite one a peer may still read")
        self.seq += 1
        self.in_flight.add(self.seq)
        self._slot(self.seq, self.rank, x).copy_(x)
        self.flags[self.rank * FLAG_STRIDE] = self.seq
        return self.seq

    def wait(self, seq: int) -> None:
        """Return once every peer published collective ``seq``."""
        flags = self.flags
        for peer in range(self.size):
            i = peer * FLAG_STRIDE
            spins = 0
            deadline = None
            while flags[i] < seq:
                spins += 1
                if spins > 200:
                    os.sched_yield()
                    if spins % 4096 == 0:
                        now = time.monotonic()
                        deadline = deadline or now + WAIT_TIMEOUT_S
                        if now > deadline:
                            raise PeerTimeout(f"tensor-parallel rank {peer} did not reach collective {seq} "
                                              f"within {WAIT_TIMEOUT_S:.0f} s")

    def reduce_into(self, x: torch.Tensor, seq: int) -> torch.Tensor:
        """After ``wait(seq)``: ``x`` becomes the sum of every rank's tensor, in rank order."""
        total = self._slot(seq, 0, x).clone()
        for r in range(1, self.size):
            total += self._slot(seq, r, x)
        self.in_flight.discard(seq)
        return x.copy_(total)

    def _check_fits(self, x: torch.Tensor) -> bool:
        if self.fits(x):
            return True
        if self.fallback is None:
            raise ValueError(f"{x.numel() * x.element_size()} bytes do not fit a {self.slot_bytes}-byte slot")
        return False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not self._check_fits(x):
            return self.fallback.all_reduce(x)
        seq = self.publish(x)
        self.wait(seq)
        return self.reduce_into(x, seq)

    def all_reduce_async(self, x: torch.Tensor):
        if not self._check_fits(x):
            return self.fallback.all_reduce_async(x)
        return PendingReduce(self, x)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.fallback.broadcast(x, src)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension."""
        if not self._check_fits(x):
            return self.fallback.all_gather_last(x)
        x = x.contiguous()
        seq = self.publish(x)
        self.wait(seq)
        out = torch.cat([self._slot(seq, r, x) for r in range(self.size)], dim=-1)
        self.in_flight.discard(seq)
        return out


class PendingReduce:
    """An all-reduce that is published and not yet summed: ``wait()`` finishes it."""

    def __init__(self, comm: ShmCommunicator, x: torch.Tensor) -> None:
        self.comm, self.x = comm, x
        self.seq = comm.publish(x)

    def wait(self) -> None:
        self.comm.wait(self.seq)
        self.comm.reduce_into(self.x, self.seq)
