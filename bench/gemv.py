"""Decode linears alone: the weight read rate of each linear kernel this CPU has.

A sweep over one model's linear weights in layer order (what a decode step reads), at a
few row counts, for every kernel that runs here, each on its own copy of the weights:

- ``q8_linear``: ``xllm_cpu::q8_linear`` over the weights as Q8_0 (int8 values and float16
  block scales: 34 bytes per 32 weights);
- ``small_linear``: ``xllm_cpu::small_linear`` over bf16 weights (CPUs with AVX-512 BF16);
- ``oneDNN bf16``: oneDNN over packed bf16 weights (CPUs oneDNN packs bf16 for);
- ``fp32``: ``F.linear`` over float32 weights (MKL; the fast float path of AVX2-only CPUs).

GB/s counts each kernel's own weight bytes; "weights/s" (in G) compares kernels across
formats. The kernels alternate within each repeat; best of ``--repeats``. Printed beside
the machine's read bandwidth measured the same way as the bound of W3
(``bench.bounds.read_bandwidth``). Records nothing.

    python -m bench.gemv --model preset:llama-110m-mha --rows 1 4 8
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from xllm_ops import linear, q8, q8_linear

from .bounds import Shape, read_bandwidth
from .common import table


def layer_weights(s: Shape) -> list[torch.Tensor]:
    """Random bf16 weights of every linear a decode step of a model of shape ``s`` reads,
    in the order it reads them (fused q/k/v and gate/up, as xllm serves them)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = [(q + 2 * kv, s.hidden), (s.hidden, q), (2 * s.intermediate, s.hidden), (s.hidden, s.intermediate)]
    return [torch.randn(n, k).bfloat16() for n, k in per_layer * s.layers + [(s.vocab, s.hidden)]]


class Kernel:
    """One way to run the sweep: a call per layer over its own weights, and their bytes."""

    def __init__(self, name: str, call: Callable, weights: list, nbytes: int, dtype: torch.dtype) -> None:
        self.name, self.call, self.weights, self.nbytes, self.dtype = name, call, weights, nbytes, dtype


def kernels_here(weights: list[torch.Tensor]) -> list[Kernel]:
    out = []
    if q8_linear.kernel_available():
        qs = [q8.quantize(w) for w in weights]
        out.append(Kernel("q8_linear", lambda x, w: torch.ops.xllm_cpu.q8_linear(x, w.values, w.scales, None), qs,
                          sum(w.values.numel() + 2 * w.scales.numel() for w in qs), torch.bfloat16))
    packed = [linear.pack(w) for w in weights]
    bf16_bytes = sum(w.numel() * 2 for w in weights)
    if packed[0] is not None and packed[0].small:
        out.append(Kernel("small_linear", lambda x, w: torch.ops.xllm_cpu.small_linear(x, w, None), weights,
                          bf16_bytes, torch.bfloat16))
    if packed[0] is not None:
        out.append(Kernel("oneDNN bf16", lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p.tensor, None, "none",
                                                                                           [], ""),
                          packed, bf16_bytes, torch.bfloat16))
    fp32 = [w.float() for w in weights]
    out.append(Kernel("fp32", lambda x, w: F.linear(x, w), fp32, 2 * bf16_bytes, torch.float32))
    return out


def sweep(kernel: Kernel, xs: dict[int, torch.Tensor], shapes: list[tuple[int, int]]) -> float:
    t0 = time.perf_counter()
    for w, (_, k) in zip(kernel.weights, shapes):
        kernel.call(xs[k], w)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="preset:llama-110m-mha")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from xllm_tools.cache import ensure_model

    name = args.model.removeprefix("preset:")
    weights = layer_weights(Shape.of(ensure_model(name) if args.model.startswith("preset:") else args.model))
    shapes = [tuple(w.shape) for w in weights]
    kernels = kernels_here(weights)
    rows = []
    for m in args.rows:
        xs = {dt: {k: torch.randn(m, k).to(dt) for _, k in shapes} for dt in (torch.bfloat16, torch.float32)}
        best = {kn.name: float("inf") for kn in kernels}
        for _ in range(args.repeats):
            for kn in kernels:
                best[kn.name] = min(best[kn.name], sweep(kn, xs[kn.dtype], shapes))
        for kn in kernels:
            s = best[kn.name]
            rows.append([m, kn.name, f"{s * 1e3:.2f}", f"{kn.nbytes / s / 1e9:.1f}",
                         f"{sum(a * b for a, b in shapes) / s / 1e9:.1f}"])
    print(table(["rows", "kernel", "ms per sweep", "GB/s", "G weights/s"], rows))
    n = sum(a * b for a, b in shapes)
    print(f"\n- {name}: {n / 1e6:.0f} M linear weights per sweep ({n * 2 / 1e6:.0f} MB bf16, "
          f"{n * 34 / 32 / 1e6:.0f} MB Q8_0); best of {args.repeats}; {args.threads} threads; "
          f"read bandwidth {read_bandwidth() / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
