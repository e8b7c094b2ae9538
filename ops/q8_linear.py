"""A linear layer over a Q8_0 weight (``xllm_ops.q8``): ``y = x @ W.T + b`` with x (..., K)
bfloat16 or float32, W (N, K) held as int8 values and float16 block scales, y in x's dtype.

``xllm_cpu::q8_linear`` (ops/csrc/q8_linear.cpp) reads the int8 weight once and multiplies
it with x quantized the same way (per row, per block of 32: scale max|x_b| / 127, int8
values). It takes any number of rows: on an AVX2 Zen 3 it keeps up with a float32 matmul
over the dequantized weight at 512 rows and faster below, and dequantizing per call costs
more than either (``python -m bench.gemv``). A CPU without the kernel (no AVX2) rounds x
the same way in torch (``q8.quantize_activations``) and multiplies by the dequantized
weight in float32: slower, the same arithmetic.

Error bound of the kernel against the float32 reference (``xllm_ops.reference.q8_linear``,
the same dequantized weight): rounding x to its block's grid moves each x_i by at most
half a step, d_b / 2 = max|x_b| / 254 (float32 rounding of the step adds a relative 1e-7);
int32 sums of int8 products are exact and the float32 sum over K / 32 blocks adds a
relative K/32 * 2^-24 of the terms' magnitudes. So for every output element

    |y - y_ref| <= (1/254 + (K/32 + 2) * 2^-24) * sum_i |W[n, i]| * max|x_block(i)|
                   + 2^-8 * |y_ref|                      (the bfloat16 output's rounding)

i.e. about 1/254 (0.4%) of the sum of |w| times its block's max |x|; the typical error is far
smaller, as the rounding errors are independent and cancel. ``error_bound`` computes
the bound for given tensors; the tests hold the kernel to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import kernels
from .q8 import BLOCK, dequantize, quantize_activations

_kernel: bool | None = None  # whether the kernel runs here, once kernel_available() has looked


def kernel_available() -> bool:
    """Whether ``xllm_cpu::q8_linear`` runs here; the first call builds or loads the native
    module and registers the op's shape rule (call it before compiling a graph)."""
    global _kernel
    if _kernel is None:
        native = kernels()
        _kernel = native is not None and native.q8_linear_available()
        if _kernel:
            @torch.library.register_fake("xllm_cpu::q8_linear")
            def _(x, values, scales, bias):
                return x.new_empty((*x.shape[:-1], values.shape[0]))
    return _kernel


def linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(values, scales).T + bias``: x (..., K), values (N, K) int8, scales
    (N, K / 32) float16, bias (N) or None -> (..., N) in x's dtype."""
    # NOTE: a compiled graph reads the flag as a constant; kernel_available() has run by then
    kernel = _kernel if _kernel is not None else kernel_available()
    if kernel and x.dtype in (torch.bfloat16, torch.float32):
        return torch.ops.xllm_cpu.q8_linear(x, values, scales, bias)
    return linear_torch(x, values, scales, bias)


def linear_torch(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch (float32), for CPUs without it."""
    y = F.linear(quantize_activations(x), dequantize(values, scales), bias.float() if bias is not None else None)
    return y.to(x.dtype)


def error_bound(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The bound above, per output element: x (M, K), the weight, reference (M, N) float32."""
    m, k = x.shape
    block_max = x.float().abs().view(m, k // BLOCK, BLOCK).amax(-1).repeat_interleave(BLOCK, -1)  # (M, K)
    w = dequantize(values, scales).abs()  # (N, K)
    return block_max @ w.T * (1 / 254 + (k / BLOCK + 2) * 2.0 ** -24) + reference.abs() * 2.0 ** -8
