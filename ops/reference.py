"""Plain-torch references for the kernels: one sequence, one head at a time, no tricks."""

from __future__ import annotations

import math

import torch


def attention_one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           num_context: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``T`` queries over ``num_context + T`` keys.

    q: (T, h, d); k, v: (num_context + T, kvh, d). Returns (T, h, d) in float32.
    """
    t, h, d = q.shape
    kvh = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty(t, h, d, dtype=torch.float32)
    for head in range(h):
        kv = head // (h // kvh)
        for i in range(t):
            keys = k[: num_context + i + 1, kv].float()  # (L, d)
            vals = v[: num_context + i + 1, kv].float()
            w = torch.softmax(keys @ q[i, head].float() * scale, dim=0)
            out[i, head] = w @ vals
    return out


def gather_sequence(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[int],
                    length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` keys and values of one sequence, token by token from the
    paged layout (K ``(N, kvh, d, bs)``, V ``(N, kvh, bs, d)``): each (length, kvh, d)."""
    bs = v_cache.shape[2]
    keys = [k_cache[block_table[p // bs], :, :, p % bs] for p in range(length)]
    values = [v_cache[block_table[p // bs], :, p % bs, :] for p in range(length)]
    return torch.stack(keys), torch.stack(values)


def q8_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear over a Q8_0 weight, in float32: x (..., K) @ W.T + bias -> (..., N) float32, W
    (N, K) = values (N, K) int8 times its block's scale, scales (N, K / 32) float16."""
    n, k = values.shape
    w = values.float().view(n, k // 32, 32) * scales.float().unsqueeze(-1)  # (N, K / 32, 32), exact
    y = x.float() @ w.view(n, k).T
    return y + bias.float() if bias is not None else y
