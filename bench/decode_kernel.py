"""The paged decode attention kernel alone: native (C++) against the plain-torch path.

    python -m bench.decode_kernel [--batch 40] [--context 500]

Warm: one layer's cache, called again and again (it stays in the CPU caches). Cold: 12
layers' caches called in turn after a large buffer is written, so K/V come from memory
as in a real decode step. Reports milliseconds per call and K/V bytes read per second.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from xllm_ops.paged_attention import kv_cache_shapes, paged_decode_attention, paged_decode_attention_torch

from .common import base_parser, report, table


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--context", type=int, default=500)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, ctx, bs = args.batch, args.context, args.block_size
    blocks = -(-ctx // bs)
    k_shape, v_shape = kv_cache_shapes(b * blocks + 1, bs, args.kv_heads, args.head_dim)
    layers = [(torch.randn(k_shape).bfloat16(), torch.randn(v_shape).bfloat16()) for _ in range(12)]
    q = torch.randn(b, args.heads, args.head_dim).bfloat16()
    block_table = torch.arange(b * blocks).view(b, blocks)
    lens = torch.full((b,), ctx)
    scale = args.head_dim ** -0.5
    kv_bytes = b * ctx * args.kv_heads * args.head_dim * 2 * 2
    flush = torch.empty(256 << 20, dtype=torch.uint8)

    def cold(fn):
        def run():
            flush.fill_(1)  # evict the caches
            t0 = time.perf_counter()
            for kc, vc in layers:
                fn(q, kc, vc, block_table, lens, scale)
            return (time.perf_counter() - t0) / len(layers)
        run()
        return statistics.median(run() for _ in range(5))

    kc, vc = layers[0]
    rows = []
    for name, fn in (("native", paged_decode_attention), ("torch", paged_decode_attention_torch)):
        warm = _time(lambda: fn(q, kc, vc, block_table, lens, scale), 20)
        rows.append((name, warm, cold(fn)))
    body = table(["path", "warm ms", "warm GB/s", "cold ms", "cold GB/s"],
                 [[name, w * 1e3, kv_bytes / w / 1e9, c * 1e3, kv_bytes / c / 1e9] for name, w, c in rows])
    report("Paged decode attention kernel", body, args,
           [f"batch {b}, context {ctx}, {args.heads} heads / {args.kv_heads} KV heads of {args.head_dim}, "
            f"blocks of {bs}, bf16, {args.threads} threads; medians; GB/s = K/V bytes read / time"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
