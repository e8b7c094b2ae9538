"""Attention over a paged KV cache.

Layout, per layer: ``k_cache`` is ``(num_blocks, num_kv_heads, head_dim, block_size)``
(each block's keys of one head stored transposed) and ``v_cache`` is
``(num_blocks, num_kv_heads, block_size, head_dim)``. Token ``t`` of a request lives in
block ``block_table[t // block_size]`` at offset ``t % block_size``. One block of one head
is a contiguous run of memory for both, and the transposed keys let the decode kernel
compute a block's scores as a sum over ``d`` of full rows of ``block_size`` tokens (it
vectorizes over tokens, with no horizontal sums). Grouped-query attention is computed
without repeating K/V: the ``num_heads // num_kv_heads`` query heads that share a KV head
are laid out as extra query rows of that KV head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import kernels


def kv_cache_shapes(num_blocks: int, block_size: int, num_kv_heads: int,
                    head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's K and V pools."""
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, num_kv_heads, block_size, head_dim)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ``(T, kvh, d)`` at flat slots ``(T,)`` of the caches."""
    native = kernels() if k_cache.device.type == "cpu" else None
    if native is not None:
        native.store_kv(k_cache, v_cache, k.to(k_cache.dtype), v.to(v_cache.dtype), slot_mapping)
        return
    write_kv_torch(k_cache, v_cache, k, v, slot_mapping)


def write_kv_torch(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """``write_kv`` in plain torch."""
    bs = v_cache.shape[2]
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    # advanced indices on dims 0 and 3 (K) or 0 and 2 (V): the indexed view is (T, kvh, d)
    k_cache[blocks, :, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = v.to(v_cache.dtype)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) block ids -> the first ``length`` keys and values of each row, each
    ``(B, kvh, length, d)`` and contiguous."""
    b = block_table.shape[0]
    _, kvh, bs, d = v_cache.shape
    k = k_cache[block_table].permute(0, 2, 1, 4, 3)  # (B, kvh, M, bs, d)
    v = v_cache[block_table].transpose(1, 2)  # (B, kvh, M, bs, d)
    return (k.reshape(b, kvh, -1, d)[:, :, :length].contiguous(),
            v.reshape(b, kvh, -1, d)[:, :, :length].contiguous())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """One query token per sequence.

    q: (B, h, d); block_tables: (B, M) int64; seq_lens: (B,) tokens in the cache per row,
    the new token included. Returns (B, h, d). On the CPU a compiled kernel reads the
    blocks in place (``csrc/paged_decode.cpp``); elsewhere the torch path gathers them.
    """
    native = kernels() if q.device.type == "cpu" else None
    if native is not None:
        return native.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                 scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """``paged_decode_attention`` in plain torch: gathers each row's context, then SDPA."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh
    length = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    k, v = gather_kv(k_cache, v_cache, block_tables, length)  # (B, kvh, L, d)
    mask = torch.arange(length).view(1, 1, 1, length) < seq_lens.view(b, 1, 1, 1)  # (B, 1, 1, L)
    qg = q.view(b, kvh, g, d).to(k.dtype)  # query heads grouped under their KV head
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, kvh, g, d)
    return out.reshape(b, h, d).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one sequence with no earlier context.

    q: (T, h, d); k, v: (T, kvh, d). Returns (T, h, d).
    """
    h, kvh = q.shape[1], k.shape[1]
    # NOTE: 4-D inputs on purpose: with 3-D ones SDPA on CPU takes its math path, about
    # 4x slower than the flash kernel at 1k tokens.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=scale, enable_gqa=h != kvh)  # (1, h, T, d)
    return out[0].transpose(0, 1)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, num_context: int, scale: float) -> torch.Tensor:
    """A chunk of ``T`` query tokens of one sequence after ``num_context`` cached tokens.

    The chunk's own K/V must already be written to the cache. q: (T, h, d);
    block_table: (M,). Query ``t`` sees cache positions ``0 .. num_context + t``.
    Returns (T, h, d).
    """
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh
    length = num_context + t
    k, v = (x[0] for x in gather_kv(k_cache, v_cache, block_table.view(1, -1), length))  # (kvh, L, d)
    pos = torch.arange(length)
    mask = pos.view(1, length) <= (num_context + torch.arange(t)).view(t, 1)  # (T, L)
    qg = q.view(t, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * t, d).to(k.dtype)
    out = F.scaled_dot_product_attention(qg[None], k[None], v[None], attn_mask=mask.repeat(g, 1), scale=scale)[0]
    return out.view(kvh, g, t, d).permute(2, 0, 1, 3).reshape(t, h, d).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step of a layer as a single opaque op: store the new K/V, attend.

    An opaque op lets a compiled graph call attention without tracing its
    data-dependent context length. q: (B, h, d); k, v: (B, kvh, d) -> (B, h, d). On the
    CPU with the native kernels it is the C++ op ``xllm_cpu::decode_attention`` (no
    Python in the call); otherwise the Python op ``xllm::decode_attention``.
    """
    if q.device.type == "cpu" and _native_decode_op():
        return torch.ops.xllm_cpu.decode_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables,
                                                   seq_lens, scale)
    return decode_attention_torch(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, scale)


_NATIVE_DECODE: list[bool] = []


def _native_decode_op() -> bool:
    """Whether ``xllm_cpu::decode_attention`` is there (its shape rule registered once)."""
    if not _NATIVE_DECODE:
        native = kernels()
        if native is not None:
            @torch.library.register_fake("xllm_cpu::decode_attention")
            def _(q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, scale):
                return q.new_empty(q.shape)
        _NATIVE_DECODE.append(native is not None)
    return _NATIVE_DECODE[0]


@torch.library.custom_op("xllm::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``decode_attention`` as a Python op (devices without the C++ op)."""
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


@decode_attention_torch.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, scale):
    return torch.empty_like(q)
