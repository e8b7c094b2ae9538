"""Linear layers with weights pre-packed for the CPU's matrix engine.

On x86 CPUs oneDNN runs bf16 matrix multiplies much faster from a weight laid out in
its own blocked format, packed once at load time (the same thing torch.compile's
weight freezing does). ``pack`` returns that packed weight, or None where it does not
apply (other dtypes, other devices, a torch without oneDNN); ``linear`` then falls
back to ``torch.nn.functional.linear``. Reference: ``F.linear(x, weight, bias)``.

A decode step's linears have a few rows (``SMALL_ROWS`` or fewer): those read the plain
weight with the C++ ``xllm_cpu::small_linear`` (ops/csrc/gemv.cpp) where the CPU has
AVX-512 BF16, and in float32 with ``xllm_cpu::small_linear_f32`` (ops/csrc/gemv_f32.cpp,
AVX2 + FMA); they stream the weight at about the machine's read bandwidth with no
per-call primitive lookup (``python -m bench.gemv`` measures them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .native import kernels


def _available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass(frozen=True)
class PackedWeight:
    """How a layer's linear runs: a bf16 weight in oneDNN's blocked layout (``tensor``)
    with its handle in the C++ registry (None without the native module) through which a
    compiled graph reaches it; and whether the small-row kernel of its dtype takes the
    layer's decode rows (``small``: ``xllm_cpu::small_linear`` for bf16,
    ``small_linear_f32`` for float32, which has no packed copy)."""

    tensor: torch.Tensor | None
    handle: int | None
    small: bool = False


def pack(weight: torch.Tensor, batch_hint: int = 8) -> PackedWeight | None:
    """What a (out, in) CPU weight runs with: a oneDNN-packed copy (bf16), the float32
    decode kernel, or None (plain ``F.linear``)."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return PackedWeight(None, None, True) if _small_f32_op() else None
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
    except RuntimeError:
        return None
    native = _graph_op()
    return PackedWeight(packed, native.register_packed(packed) if native is not None else None, _small_op())


SMALL_ROWS = 8


@functools.cache
def _small_op() -> bool:
    """Whether ``xllm_cpu::small_linear`` runs here (its shape rule registered once)."""
    native = kernels()
    if native is None or not native.small_linear_available():
        return False

    @torch.library.register_fake("xllm_cpu::small_linear")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return True


@functools.cache
def _graph_op():
    """The native module once ``xllm_cpu::packed_linear`` has its shape rule, or None."""
    native = kernels()
    if native is None:
        return None

    @torch.library.register_fake("xllm_cpu::packed_linear")
    def _(x, weight, handle, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return native


@functools.cache
def _small_f32_op() -> bool:
    """Whether ``xllm_cpu::small_linear_f32`` runs here (its shape rule registered once)."""
    native = kernels()
    if native is None or not native.small_linear_f32_available():
        return False

    @torch.library.register_fake("xllm_cpu::small_linear_f32")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return True


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, from the packed weight when there is one."""
    if packed is not None and packed.tensor is None:  # float32: the kernel for decode rows
        if x.dtype == torch.float32 and x.numel() <= SMALL_ROWS * x.shape[-1]:
            return torch.ops.xllm_cpu.small_linear_f32(x, weight, bias)
        return F.linear(x, weight, bias)
    if packed is None or x.dtype != torch.bfloat16:
        return F.linear(x, weight, bias)
    if packed.small and x.numel() <= SMALL_ROWS * x.shape[-1]:
        return torch.ops.xllm_cpu.small_linear(x, weight, bias)
    if torch.compiler.is_compiling():
        if packed.handle is None:
            return F.linear(x, weight, bias)
        # NOTE: an opaque op, so graphs compile without weight freezing (and stay cacheable)
        return torch.ops.xllm_cpu.packed_linear(x, weight, packed.handle, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [], "")
