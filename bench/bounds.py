"""The machine's two bounds, measured in the run, and what a workload needs of each.

- Bandwidth bound of a decode step (single stream): the bytes of weights one step reads
  over the read bandwidth (``read_bandwidth``: summing a 1 GiB tensor). One step reads
  every weight once, the input embedding aside (one row of it).
- Compute bound of a workload (batched): the FLOPs it needs over the matmul rate
  (``matmul_rate``: a large GEMM in the serving dtype with every thread). The FLOPs (``workload_flops``):
  2 per weight per token for the layers' linears, the output head once per prompt (its
  last position) and once per generated token, and causal attention (QKᵀ and PV: 4 ×
  layers × heads × head_dim per token per earlier position).

Both come from the config, so a GGUF file and a safetensors directory of one shape get
the same bound (counted at ``bytes_per_weight``: 2 for bf16, 4 for float32, 34/32 for Q8_0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of summing a ``gib`` GiB float32 tensor (best of ``repeats``)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def matmul_rate(n: int = 2048, dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> float:
    """FLOP/s of an ``n``³ GEMM in ``dtype`` (best of ``repeats``), every torch thread."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclass(frozen=True)
class Shape:
    """What the bounds need of a decoder-only transformer's config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, model: str | Path) -> "Shape":
        from xllm.config import read_hf_config

        c = read_hf_config(model)
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def layer_weights(self) -> int:
        """Weights of the layers' linears (norms are negligible and left out)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def decode_bytes(self, bytes_per_weight: float = 2.0) -> float:
        """Bytes of weights one decode step reads: the layers, the output head, one embedding row."""
        weights = self.layer_weights + self.vocab * self.hidden + self.hidden * self.layers * 2
        return weights * bytes_per_weight + self.hidden * bytes_per_weight

    def flops(self, prompt: int, output: int) -> float:
        """FLOPs one request of ``prompt`` tokens and ``output`` generated tokens needs."""
        tokens = prompt + output - 1  # the last generated token is never fed back
        linear = 2 * self.layer_weights * tokens + 2 * self.vocab * self.hidden * output
        positions = tokens * (tokens + 1) / 2  # causal: token i attends to i + 1 positions
        return linear + 4 * self.layers * self.heads * self.head_dim * positions


def workload_flops(shape: Shape, requests) -> float:
    """FLOPs of a list of ``BenchRequest``."""
    return sum(shape.flops(len(r.prompt), r.max_tokens) for r in requests)
