"""The PD KV transfer itself: how fast the agents' path moves KV, and how much of it the
prefill hides.

    python -m bench.kv_transfer [--prompt-len 4064] [--requests 3]

1. **Path speed**, no model: one request's KV (``--prompt-len`` tokens of the model's
   shape, every layer, K and V) moved between two shared pools the way the KV agents move
   it (gather the blocks, a ``KVLayer`` message per layer, zero-copy frames, scatter into
   the other pool), from one process to another over ``ipc://`` and over ``tcp://``
   (loopback), against a plain in-process copy of the same bytes (numpy gather/scatter).
2. **Hidden behind the prefill**, a real ``--pd 1:1`` deployment: sequential requests of
   ``--prompt-len`` tokens; the decode side measures, per request, how long KV was still
   arriving after the prefill's last layer was stored (``kv_exposed_seconds``). With
   layer-wise sending (the default) against ``--no-kv-layerwise`` (each step's KV pushed
   once the step is done; the prompt is prefilled in one step, so this is sending after
   the prefill): hidden = 1 − exposed(layer-wise) / exposed(after the step).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop
import zmq
import zmq.asyncio

from xllm.bus.channel import Channel
from xllm.config import read_hf_config
from xllm.kv_transfer.pool import SharedKVPool
from xllm.models.spec import DecoderSpec
from xllm.protocol import KVAgentInput, KVLayer
from xllm.sdk import AsyncClient

from .common import base_parser, report, resolve_model, table
from .drive import deployment, warm_up

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def _receive(address: str, pool_file: str, messages: int, done) -> None:
    """The receiving agent's part: write every KVLayer into the pool, then say done."""
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        pool = SharedKVPool.attach(Path(pool_file))
        ch = Channel(ctx, zmq.PULL, address, bind=True, union=KVAgentInput)
        done.send("ready")
        for _ in range(messages):
            msg = await ch.recv()
            pool.write(msg.layer, msg.dst_blocks, msg.k, msg.v)
        done.send(time.perf_counter())
        ch.close()
        ctx.term()

    uvloop.run(main())


async def _send(address: str, src: SharedKVPool, blocks: list[int]) -> None:
    ctx = zmq.asyncio.Context()
    ch = Channel(ctx, zmq.PUSH, address, bind=False)
    for layer in range(src.num_layers):
        k, v = src.read(layer, blocks)
        await ch.send(KVLayer("r", 0, layer, blocks, k, v))
    await asyncio.sleep(0)
    ch.sock.close(linger=-1)  # delivered before the context ends
    ctx.term()


def path_speed(layers: int, block_bytes: int, num_blocks: int, address: str, repeats: int) -> float:
    """GB/s of one request's KV through the agents' path, best of ``repeats``."""
    tmp = Path(tempfile.mkdtemp(prefix="xllm-kvbench-"))
    src = SharedKVPool.create(Path("/dev/shm") / f"xllm-kvbench-src-{tmp.name}", layers, num_blocks * 2, block_bytes)
    dst = SharedKVPool.create(Path("/dev/shm") / f"xllm-kvbench-dst-{tmp.name}", layers, num_blocks * 2, block_bytes)
    try:
        src.data[:] = np.random.default_rng(0).integers(0, 255, src.data.shape, dtype=np.uint8)
        blocks = random.Random(0).sample(range(num_blocks * 2), num_blocks)
        best = 0.0
        for _ in range(repeats):
            here, there = mp.get_context("spawn").Pipe()
            proc = mp.get_context("spawn").Process(target=_receive, args=(address, str(dst.path), layers, there))
            proc.start()
            assert here.recv() == "ready"
            t0 = time.perf_counter()
            uvloop.run(_send(address, src, blocks))
            t1 = here.recv()
            proc.join()
            best = max(best, 2 * layers * num_blocks * block_bytes / (t1 - t0) / 1e9)
        for layer in (0, layers - 1):  # what arrived is what was sent
            assert np.array_equal(dst.data[layer, 0][blocks], src.data[layer, 0][blocks])
        return best
    finally:
        for pool in (src, dst):
            pool.path.unlink(missing_ok=True)


def copy_speed(layers: int, block_bytes: int, num_blocks: int, repeats: int) -> float:
    """GB/s of the same bytes gathered and scattered between two arrays in one process."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (layers, 2, num_blocks * 2, block_bytes), dtype=np.uint8)
    dst = np.zeros_like(src)
    blocks = np.asarray(random.Random(0).sample(range(num_blocks * 2), num_blocks))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(layers):
            for kv in (0, 1):
                dst[layer, kv][blocks] = src[layer, kv].take(blocks, axis=0)
        best = max(best, 2 * layers * num_blocks * block_bytes / (time.perf_counter() - t0) / 1e9)
    return best


async def exposed(address: str, prompt_len: int, requests: int, vocab: int) -> dict:
    """Sequential long requests; the decode side's transfer figures per request."""
    rng = random.Random(1)
    async with AsyncClient(address) as c:
        await warm_up(c, vocab)
        before = (await c.call("stats"))["instances"]["i1"]
        ttfts = []
        for _ in range(requests):
            prompt = [rng.randint(3, vocab - 1) for _ in range(prompt_len)]
            t0 = time.perf_counter()
            async for delta in c.stream(prompt_token_ids=prompt, max_tokens=2, ignore_eos=True, temperature=0.0):
                if delta.token_ids:
                    ttfts.append(time.perf_counter() - t0)
                    break
        await asyncio.sleep(1.0)
        after = (await c.call("stats"))["instances"]["i1"]
    n = after["kv_transfers"] - before["kv_transfers"]
    return {"n": n, "ttft": sum(ttfts) / len(ttfts),
            "bytes": (after["kv_transfer_bytes"] - before["kv_transfer_bytes"]) / n,
            "exposed": (after["kv_exposed_seconds"] - before["kv_exposed_seconds"]) / n,
            "seconds": (after["kv_transfer_seconds"] - before["kv_transfer_seconds"]) / n}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=4064)
    p.add_argument("--requests", type=int, default=3, help="long requests per mode")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3, help="path-speed runs (the best is reported)")
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    spec = DecoderSpec.from_hf(read_hf_config(model_dir))
    block_bytes = spec.num_kv_heads * spec.head_dim * args.block_size * DTYPE_BYTES[args.dtype]
    num_blocks = -(-args.prompt_len // args.block_size)
    total = 2 * spec.num_layers * num_blocks * block_bytes

    speeds = {"in-process copy (numpy gather/scatter)": copy_speed(spec.num_layers, block_bytes, num_blocks, args.repeats)}
    with tempfile.TemporaryDirectory() as d:
        speeds["agents' path over ipc://"] = path_speed(spec.num_layers, block_bytes, num_blocks,
                                                        f"ipc://{d}/kv", args.repeats)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    speeds["agents' path over tcp:// (loopback)"] = path_speed(spec.num_layers, block_bytes, num_blocks,
                                                               f"tcp://127.0.0.1:{port}", args.repeats)
    for k, v in speeds.items():
        print(f"{k}: {v:.2f} GB/s", flush=True)

    vocab = spec.vocab_size
    modes = {}
    for label, extra in (("layer by layer", []), ("after each step", ["--no-kv-layerwise"])):
        flags = ["--pd", "1:1", "--dtype", args.dtype, "--enforce-eager", "--block-size", str(args.block_size),
                 "--max-num-batched-tokens", str(max(args.prompt_len, 2048))]  # the prefill in one step
        with deployment(model_dir, flags + extra, label) as dep:
            modes[label] = uvloop.run(exposed(dep.address, args.prompt_len, args.requests, vocab))
        print(label, modes[label], flush=True)
    lw, after = modes["layer by layer"], modes["after each step"]
    hidden = 1 - lw["exposed"] / after["exposed"] if after["exposed"] > 0 else float("nan")

    rows = [[k, f"{total / 1e6:.1f}", f"{v:.2f}"] for k, v in speeds.items()]
    body = table(["path", "MB per request", "GB/s"], rows) + "\n\n" + table(
        ["sending", "requests", "TTFT ms", "KV MB", "transfer ms (expect → complete)",
         "exposed ms (after the prefill's last layer)"],
        [[k, m["n"], m["ttft"] * 1000, f"{m['bytes'] / 1e6:.1f}", m["seconds"] * 1000, m["exposed"] * 1000]
         for k, m in modes.items()])
    notes = [f"model {model_dir.name} ({args.dtype}): {spec.num_layers} layers, {spec.num_kv_heads} KV heads × "
             f"{spec.head_dim}; a {args.prompt_len}-token prompt is {num_blocks} blocks of {args.block_size}, "
             f"{total / 1e6:.1f} MB of KV",
             "path speed: best of the runs, from the first gather to the last block written on the other side",
             f"hidden behind the prefill: 1 − exposed(layer by layer) / exposed(after each step) = {hidden:.1%}",
             "deployments: --pd 1:1 --enforce-eager, one thread per instance, the prompt prefilled in one "
             "step; sequential requests"]
    report("KV transfer (PD)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
