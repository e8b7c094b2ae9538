"""Linear layers with weights pre-packed for the CPU's matrix engine.

On x86 CPUs oneDNN runs bf16 matrix multiplies much faster from a weight laid out in
its own blocked format, packed once at load time (the same thing torch.compile's
weight freezing does). ``pack`` returns that packed weight, or None where it does not
apply (other dtypes, other devices, a torch without oneDNN); ``linear`` then falls
back to ``torch.nn.functional.linear``. Reference: ``F.linear(x, weight, bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack(weight: torch.Tensor, batch_hint: int = 8) -> torch.Tensor | None:
    """oneDNN-packed copy of a (out, in) bf16 CPU weight, or None if packing does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
    except RuntimeError:
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, from the packed weight when there is one."""
    if packed is None or x.dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)  # NOTE: a compiled graph packs weights itself (freezing)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
