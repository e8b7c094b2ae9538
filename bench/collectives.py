"""The cost of one decode step's collectives on this machine, without the model.

Two processes (one thread each) join a gloo group the way ``--tp 2`` workers do and time
the collectives a Llama decode step issues: one all-reduce of the hidden state for the
embedding and two per layer (attention output, MLP output), one all-gather of the
vocab-parallel logits, and the broadcast of rank 0's sampled tokens.

    python -m bench.collectives [--batches 8,32]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _median_seconds(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank_main(rank: int, init_file: str, shapes: dict, reps: int, out) -> None:
    import torch.distributed as dist

    from xllm.platform.shm_comm import ShmCommunicator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    biggest = max(max(b * h * 4, b * v * 4) for b, (h, v, _) in shapes.items())
    shm = ShmCommunicator(init_file, rank, 2, biggest, dist.barrier)
    result = {}
    for batch, (hidden, vocab_part, dtype_name) in shapes.items():
        dtype = getattr(torch, dtype_name)
        h = torch.randn(batch, hidden).to(dtype)
        logits = torch.randn(batch, vocab_part)
        parts = [torch.empty_like(logits) for _ in range(2)]
        tokens = torch.zeros(batch, dtype=torch.int64)
        result[batch] = (
            _median_seconds(lambda: dist.all_reduce(h), reps),
            _median_seconds(lambda: dist.all_gather(parts, logits), reps),
            _median_seconds(lambda: dist.broadcast(tokens, src=0), reps),
            _median_seconds(lambda: shm.all_reduce(h), reps),
            _median_seconds(lambda: shm.all_gather_last(logits), reps),
        )
    dist.barrier()
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def measure(batches: list[int], hidden: int, vocab: int, dtype: str = "bfloat16",
            reps: int = 200) -> dict[int, tuple[float, ...]]:
    """Median seconds of (all-reduce [b, hidden], all-gather [b, vocab/2] fp32, broadcast
    [b] int64) over gloo, then of the all-reduce and all-gather through shared memory
    (``xllm.platform.shm_comm``), per batch size, seen by rank 0 of 2 processes."""
    shapes = {b: (hidden, vocab // 2, dtype) for b in batches}
    return _two_ranks(_rank_main, shapes, reps)


def _bare_rank_main(rank: int, init_file: str, model_dir: str, batches: list[int], context: int,
                    iters: int, out) -> None:
    import torch.distributed as dist

    from xllm.layers.parallel import ProcessGroupComm, TPGroup
    from xllm.platform.shm_comm import ShmCommunicator

    from .bare_forward import DecodeBench

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    shm = ShmCommunicator(init_file, rank, 2, 8 << 20, dist.barrier,  # decode steps of up to 64 rows
                          fallback=ProcessGroupComm(dist.group.WORLD))
    tp = TPGroup(rank, 2, shm)
    result = {}
    for batch in batches:
        for overlap in (False, True):
            bench = DecodeBench(Path(model_dir), batch, context, iters + 3, graphs=False, tp=tp,
                                micro_batch_overlap=overlap)
            result[(batch, overlap)] = bench.measure(iters, 3)["runner"]
            del bench
    dist.barrier()
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def bare_tp_steps(model_dir: Path, batches: list[int], context: int = 192,
                  iters: int = 20) -> dict[tuple[int, bool], float]:
    """Median seconds of ``ModelRunner.execute`` for one decode step in two TP ranks (one
    thread each, shared-memory collectives, no scheduler or frontend beside them), keyed
    by (batch, overlap)."""
    return _two_ranks(_bare_rank_main, str(model_dir), batches, context, iters)


def _two_ranks(target, *args, timeout: float = 1200.0):
    """Run ``target(rank, init_file, *args, out)`` in two spawned processes; rank 0's
    ``out.put`` is the result."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=target, args=(r, init_file, *args, out)) for r in range(2)]
        for p in procs:
            p.start()
        result = out.get(timeout=timeout)
        for p in procs:
            p.join(timeout=60)
    return result


def step_collective_ms(costs: tuple[float, ...], layers: int, shm: bool = False) -> float:
    """Milliseconds of collectives in one decode step: 1 + 2 × layers all-reduces, one
    all-gather (gloo or shared memory), one broadcast (gloo either way)."""
    all_reduce, all_gather, broadcast, shm_reduce, shm_gather = costs
    if shm:
        all_reduce, all_gather = shm_reduce, shm_gather
    return ((1 + 2 * layers) * all_reduce + all_gather + broadcast) * 1000


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    for b, costs in measure(batches, args.hidden, args.vocab).items():
        ar, ag, bc, sar, sag = (c * 1e6 for c in costs)
        print(f"batch {b}: gloo all-reduce {ar:.0f} µs, all-gather {ag:.0f} µs, broadcast {bc:.0f} µs "
              f"(per step {step_collective_ms(costs, args.layers):.1f} ms); shared memory all-reduce {sar:.0f} µs, "
              f"all-gather {sag:.0f} µs (per step {step_collective_ms(costs, args.layers, shm=True):.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
