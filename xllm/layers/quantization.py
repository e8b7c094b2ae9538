"""How a linear layer keeps its weight and multiplies by it: one method per weight format.

A layer with a matrix weight (the linears and the LM head) asks its method to create the
weight, to write checkpoint rows into it, to prepare it for serving once loaded, and to
apply it. The layers decide which rows go where (tensor-parallel slices, fused q/k/v);
the method decides what a row is stored as.

- ``DenseMethod`` (``--quantization none``): the weight in the serving dtype, packed for
  oneDNN (``xllm_ops.linear``).
- ``Q8Method`` (``--quantization q8_0``): the weight as Q8_0 (``xllm_ops.q8``): ``weight``
  is the int8 values (out, in) and the buffer ``weight_scales`` their float16 block scales
  (out, in / 32). Rows that arrive as Q8_0 (a GGUF file's own blocks) are copied as they
  are; float rows are quantized as llama.cpp would.
"""

from __future__ import annotations

import torch
from torch import nn

from xllm_ops import linear as packed_linear
from xllm_ops import q8, q8_linear


class DenseMethod:
    """The weight in the layer's dtype."""

    def create(self, layer: nn.Module, rows: int, cols: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype), requires_grad=False)
        layer.packed = None

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        """Write checkpoint rows (n, cols) at row ``offset``."""
        layer.weight.data[offset:offset + rows.shape[0]].copy_(rows)

    def prepare(self, layer: nn.Module) -> None:
        layer.packed = packed_linear.pack(layer.weight.data)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear.linear(x, layer.weight, layer.packed, bias)


class Q8Method:
    """The weight as Q8_0 blocks: int8 ``weight`` and float16 ``weight_scales``."""

    def create(self, layer: nn.Module, rows: int, cols: int, dtype: torch.dtype) -> None:
        if cols % q8.BLOCK:
            raise ValueError(f"--quantization q8_0 needs input sizes that are multiples of {q8.BLOCK}, got {cols}")
        layer.weight = nn.Parameter(torch.zeros(rows, cols, dtype=torch.int8), requires_grad=False)
        layer.register_buffer("weight_scales", torch.zeros(rows, cols // q8.BLOCK, dtype=torch.float16))

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor | q8.Q8Tensor) -> None:
        """Write checkpoint rows (n, cols), float or Q8_0, at row ``offset``."""
        q = rows if isinstance(rows, q8.Q8Tensor) else q8.quantize(rows)
        n = q.shape[0]
        layer.weight.data[offset:offset + n].copy_(q.values)
        layer.weight_scales[offset:offset + n].copy_(q.scales)

    def prepare(self, layer: nn.Module) -> None:
        q8_linear.kernel_available()  # builds the kernel and its shape rule before any graph is traced

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return q8_linear.linear(x, layer.weight, layer.weight_scales, bias)


def linear_method(quantization: str) -> DenseMethod | Q8Method:
    """The method of ``--quantization`` (``none`` or ``q8_0``)."""
    if quantization == "none":
        return DenseMethod()
    if quantization == "q8_0":
        return Q8Method()
    raise ValueError(f"--quantization must be none or q8_0, got {quantization!r}")
