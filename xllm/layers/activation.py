"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2n) -> (...,n): silu(gate) * up, with gate and up side by side."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
