"""Rotary position embedding (rotate-half form) and the RoPE scaling variants that
Llama, Qwen2 and Qwen3 checkpoints ship with: default, linear, llama3 and yarn.

The frequency formulas follow the published methods (Llama 3.1 frequency smoothing;
YaRN's NTK-by-parts interpolation with its attention temperature).
"""

from __future__ import annotations

import math

import torch
from torch import nn




def inverse_frequencies(params: dict, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (dim/2,), attention scaling factor) for one rope config."""
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    factor = float(params["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old = float(params["original_max_position_embeddings"])
        low_wl = old / float(params["low_freq_factor"])
        high_wl = old / float(params["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - params["low_freq_factor"]) / (
            params["high_freq_factor"] - params["low_freq_factor"])
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        return torch.where(mid, blended, out), 1.0
    if kind == "yarn":
        return _yarn(params, inv, dim, base, factor, max_position)
    raise NotImplementedError(f"RoPE type {kind!r} is not supported (default, linear, llama3, yarn are)")


def _yarn(params: dict, inv: torch.Tensor, dim: int, base: float, factor: float,
          max_position: int) -> tuple[torch.Tensor, float]:
    old = params.get("original_max_position_embeddings") or max_position
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    mscale = params.get("mscale")
    mscale_all = params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv / factor) * (1 - extrapolation) + inv * extrapolation, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (T, heads, head_dim) queries and keys at given positions."""

    def __init__(self, head_dim: int, max_position: int, params: dict) -> None:
        super().__init__()
        inv, scale = inverse_frequencies(params, head_dim, max_position)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (P, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, d)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # (T, 1, d)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
