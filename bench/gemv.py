"""Decode linears alone: the weight read rate of ``xllm_cpu::small_linear`` and of oneDNN.

A sweep over one model's linear weights in layer order (what a decode step reads), at a
few row counts, for both kernels, beside the machine's read bandwidth measured the same
way as the bound of W3 (``bench.bounds.read_bandwidth``). Prints GB/s; records nothing.

    python -m bench.gemv --model preset:llama-110m-mha --rows 1 4 16
"""

from __future__ import annotations

import argparse
import time

import torch

from xllm_ops import linear

from .bounds import Shape, read_bandwidth
from .common import table


def layer_weights(s: Shape) -> list[torch.Tensor]:
    """Random bf16 weights of every linear a decode step of a model of shape ``s`` reads,
    in the order it reads them (fused q/k/v and gate/up, as xllm serves them)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = [(q + 2 * kv, s.hidden), (s.hidden, q), (2 * s.intermediate, s.hidden), (s.hidden, s.intermediate)]
    return [torch.randn(n, k).bfloat16() for n, k in per_layer * s.layers + [(s.vocab, s.hidden)]]


def sweep_seconds(weights, packed, rows: int, small: bool, repeats: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).bfloat16() for w in weights}
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, p in zip(weights, packed):
            x = xs[w.shape[1]]
            if small:
                torch.ops.xllm_cpu.small_linear(x, w, None)
            else:
                torch.ops.mkldnn._linear_pointwise(x, p.tensor, None, "none", [], "")
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="preset:llama-110m-mha")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from xllm_tools.cache import ensure_model

    name = args.model.removeprefix("preset:")
    weights = layer_weights(Shape.of(ensure_model(name) if args.model.startswith("preset:") else args.model))
    packed = [linear.pack(w) for w in weights]
    if packed[0] is None or not packed[0].small:
        raise SystemExit("needs oneDNN and AVX-512 BF16 (xllm_cpu::small_linear) on this CPU")
    total = sum(w.numel() * 2 for w in weights)
    rows = []
    for m in args.rows:
        small = sweep_seconds(weights, packed, m, True, args.repeats)
        onednn = sweep_seconds(weights, packed, m, False, args.repeats)
        rows.append([m, f"{small * 1e3:.2f}", f"{total / small / 1e9:.1f}", f"{onednn * 1e3:.2f}",
                     f"{total / onednn / 1e9:.1f}"])
    print(table(["rows", "small_linear ms", "GB/s", "oneDNN ms", "GB/s"], rows))
    print(f"\n- {name}: {total / 1e6:.0f} MB of bf16 linear weights per sweep; best of {args.repeats}; "
          f"{args.threads} threads; read bandwidth {read_bandwidth() / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
