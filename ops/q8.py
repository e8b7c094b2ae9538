"""Q8_0 weights, GGUF's 8-bit format: blocks of 32 values along a row, each an int8 times
one float16 scale of the block.

A GGUF file stores a block as 34 bytes, the scale then the 32 values. ``Q8Tensor`` holds
the same numbers as two arrays, values (N, K) int8 and scales (N, K / 32) float16, which is
what ``xllm_cpu::q8_linear`` reads: whole 32-byte blocks at fixed strides, no 2-byte offsets,
and rows that torch can slice and reorder like any matrix (a row permutation or a slice of
rows keeps every block whole). ``from_blocks`` and ``blocks`` convert to and from the file's
bytes without touching a value.

``quantize`` rounds like ``gguf.quants.quantize(w, Q8_0)`` (llama.cpp's reference): per
block, scale d = max|w| / 127 in float32, values round-half-away-from-zero(w * (1 / d)),
then d stored as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32  # values per block
BLOCK_BYTES = 2 + BLOCK  # one block in a GGUF file: float16 scale, then the int8 values


@dataclass(frozen=True)
class Q8Tensor:
    """A (N, K) matrix in Q8_0: ``values[n, k] * scales[n, k // 32]``."""

    values: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N, K / 32) float16

    def __post_init__(self) -> None:
        n, k = self.values.shape
        if self.values.dtype != torch.int8 or self.scales.dtype != torch.float16:
            raise TypeError("Q8Tensor holds int8 values and float16 scales")
        if k % BLOCK or tuple(self.scales.shape) != (n, k // BLOCK):
            raise ValueError(f"Q8Tensor: values {tuple(self.values.shape)} need scales ({n}, {k // BLOCK}), "
                             f"got {tuple(self.scales.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def narrow(self, dim: int, start: int, length: int) -> "Q8Tensor":
        """Rows (dim 0), or whole blocks of columns (dim 1), like ``Tensor.narrow``."""
        if dim == 0:
            return Q8Tensor(self.values.narrow(0, start, length), self.scales.narrow(0, start, length))
        if start % BLOCK or length % BLOCK:
            raise ValueError(f"Q8Tensor columns go in whole blocks of {BLOCK}: start {start}, length {length}")
        return Q8Tensor(self.values.narrow(1, start, length), self.scales.narrow(1, start // BLOCK, length // BLOCK))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in ``dtype``."""
        return dequantize(self.values, self.scales, dtype)

    def blocks(self) -> np.ndarray:
        """The GGUF bytes, (N, K / 32 * 34) uint8: per block the scale, then the values."""
        n, k = self.values.shape
        d = self.scales.contiguous().numpy().view(np.uint8).reshape(n, k // BLOCK, 2)
        q = self.values.contiguous().numpy().view(np.uint8).reshape(n, k // BLOCK, BLOCK)
        return np.concatenate([d, q], axis=2).reshape(n, k // BLOCK * BLOCK_BYTES)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values (N, K) int8 and scales (N, K / 32) float16 -> (N, K) in ``dtype``; exact in float32
    (an int8 times a float16 has at most 18 significant bits)."""
    n, k = values.shape
    w = values.float().view(n, k // BLOCK, BLOCK) * scales.float().unsqueeze(-1)  # (N, K / 32, 32)
    return w.view(n, k).to(dtype)


def from_blocks(raw: np.ndarray) -> Q8Tensor:
    """A GGUF Q8_0 tensor's bytes, (N, K / 32 * 34) uint8 as ``GGUFReader`` gives them, as a
    ``Q8Tensor`` (copied out of the file's memory map, not converted)."""
    n, width = raw.shape
    if width % BLOCK_BYTES:
        raise ValueError(f"a Q8_0 row is whole {BLOCK_BYTES}-byte blocks, got {width} bytes")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, width // BLOCK_BYTES, BLOCK_BYTES)
    scales = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(n, -1)
    values = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, -1)
    return Q8Tensor(torch.from_numpy(values.copy()), torch.from_numpy(scales.copy()))


def quantize(w: torch.Tensor) -> Q8Tensor:
    """A float (N, K) matrix as Q8_0, bit for bit what ``gguf.quants.quantize`` gives."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"Q8_0 needs rows of whole {BLOCK}-value blocks, got {k} columns")
    blocks = w.detach().to(torch.float32).reshape(n, k // BLOCK, BLOCK)  # (N, K / 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # float32, as the reference
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv
    a = scaled.abs()
    whole = torch.floor(a)
    q = torch.sign(scaled) * (whole + torch.floor(2 * (a - whole)))  # round half away from zero, exactly
    return Q8Tensor(q.to(torch.int8).reshape(n, k).contiguous(), d.squeeze(-1).to(torch.float16).contiguous())


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) rounded to Q8 blocks and back, in float32: per 32-value block of a row, scale
    d = max|x_b| / 127 and values round(x_b * (127 / max|x_b|)), half to even -- how
    ``xllm_cpu::q8_linear`` rounds its input before the int8 dot products."""
    *lead, k = x.shape
    b = x.to(torch.float32).reshape(-1, k // BLOCK, BLOCK)  # (rows, K / 32, 32)
    m = b.abs().amax(dim=-1, keepdim=True)
    # NOTE: a tensor divided into a number is not correctly rounded in torch (127 * (1 / m));
    # a tensor numerator is, like the kernel's float division
    inv = torch.where(m > 0, torch.full_like(m, 127.0) / m, torch.zeros_like(m))
    return (torch.round(b * inv) * (m / 127)).reshape(*lead, k)

