"""Shared-memory collectives of tensor-parallel CPU ranks (``xllm.platform.shm_comm``)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from xllm.platform.shm_comm import PendingReduce, ShmCommunicator

pytestmark = pytest.mark.skipif(not ShmCommunicator.available(), reason="no /dev/shm here")


def _rank(rank: int, size: int, init_file: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    comm = ShmCommunicator(init_file, rank, size, 1 << 16, dist.barrier)
    g = torch.Generator().manual_seed(rank)
    got = {}
    for step in range(6):  # more collectives than slots: the ring is reused
        x = torch.randn(8, 64, generator=g).to(torch.bfloat16)
        got[f"reduce{step}"] = comm.all_reduce(x.clone())
        got[f"input{step}"] = x
    # two in flight, finished out of order, as micro-batch overlap does
    a, b = torch.full((4,), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1))
    pa, pb = PendingReduce(comm, a), PendingReduce(comm, b)
    pb.wait()
    pa.wait()
    got["a"], got["b"] = a, b
    got["gather"] = comm.all_gather_last(torch.full((2, 3), float(rank)))
    # NOTE: by value (numpy), not as shared tensors: this process may be gone before the
    # parent reads the queue, and a shared tensor's memory would go with it
    out.put((rank, {k: (str(v.dtype), v.float().numpy()) for k, v in got.items()}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_sum_and_gather_identically_on_every_rank(size, tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, size, str(tmp_path / "init"), out)) for r in range(size)]
    for p in procs:
        p.start()
    dtypes = {"torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32}
    results = {rank: {k: torch.from_numpy(a).to(dtypes[dt]) for k, (dt, a) in got.items()}
               for rank, got in (out.get(timeout=120) for _ in range(size))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for step in range(6):
        expected = results[0][f"input{step}"].clone()
        for r in range(1, size):
            expected += results[r][f"input{step}"]  # rank order, like the communicator
        for r in range(size):
            assert torch.equal(results[r][f"reduce{step}"], expected)
    total = sum(range(1, size + 1))
    for r in range(size):
        assert torch.equal(results[r]["a"], torch.full((4,), float(total)))
        assert torch.equal(results[r]["b"], torch.full((4,), 10.0 * total))
        assert torch.equal(results[r]["gather"], torch.cat([torch.full((2, 3), float(k)) for k in range(size)], -1))


def test_a_third_collective_in_flight_is_refused(tmp_path):
    """The four-slot ring is safe only with at most two collectives in flight per rank."""
    comm = ShmCommunicator(str(tmp_path / "solo"), 0, 1, 1 << 12, lambda: None)
    a, b = PendingReduce(comm, torch.ones(4)), PendingReduce(comm, torch.ones(4))
    with pytest.raises(RuntimeError, match="in flight"):
        PendingReduce(comm, torch.ones(4))
    a.wait()
    c = PendingReduce(comm, torch.full((4,), 2.0))  # one finished: room again
    b.wait()
    c.wait()
    assert torch.equal(c.x, torch.full((4,), 2.0))
