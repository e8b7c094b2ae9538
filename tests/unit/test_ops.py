"""Kernels in ``ops/`` against their plain-torch references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xllm_ops import linear, native, paged_decode_attention, paged_prefill_attention, prefill_attention, write_kv
from xllm_ops.paged_attention import kv_cache_shapes, paged_decode_attention_torch, write_kv_torch
from xllm_ops.reference import attention_one_sequence, gather_sequence

BS, KVH, H, D = 4, 2, 6, 8


def paged_sequences(lengths: list[int], dtype=torch.float32, seed: int = 0, bs: int = BS, kvh: int = KVH,
                    d: int = D, write=write_kv):
    """Random K/V for each sequence, scattered into shuffled cache blocks."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // bs) for n in lengths) + 3
    k_shape, v_shape = kv_cache_shapes(n_blocks, bs, kvh, d)
    k_cache = torch.randn(k_shape, generator=g).to(dtype)  # garbage where nothing was written
    v_cache = torch.randn(v_shape, generator=g).to(dtype)
    order = torch.randperm(n_blocks, generator=g).tolist()
    tables, seqs = [], []
    for n in lengths:
        blocks = [order.pop() for _ in range(-(-n // bs))]
        k = torch.randn(n, kvh, d, generator=g).to(dtype)
        v = torch.randn(n, kvh, d, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
        write(k_cache, v_cache, k, v, slots)
        tables.append(blocks)
        seqs.append((k, v))
    return k_cache, v_cache, tables, seqs


@pytest.mark.parametrize("write", [write_kv, write_kv_torch], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_places_tokens_by_block_table(write, dtype):
    k_cache, v_cache, tables, seqs = paged_sequences([5, 9], dtype, write=write)
    for table, (k, v) in zip(tables, seqs):
        got_k, got_v = gather_sequence(k_cache, v_cache, table, len(k))
        assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_the_native_cpu_kernel_builds():
    assert native.kernels() is not None, "the C++ decode kernel did not build (see the log)"


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [3, 17, 8], [12, 1, 30, 4]])
def test_paged_decode_attention(lengths, dtype, impl):
    fn = paged_decode_attention if impl == "native" else paged_decode_attention_torch
    k_cache, v_cache, tables, seqs = paged_sequences(lengths, dtype)
    q = torch.randn(len(lengths), H, D).to(dtype)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out = fn(q, k_cache, v_cache, table, torch.tensor(lengths), 1 / math.sqrt(D))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (k, v) in enumerate(seqs):
        ref = attention_one_sequence(q[i:i + 1], k, v, num_context=len(k) - 1)
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 4, 64), (20, 2, 32), (4, 4, 16)])
def test_native_decode_at_serving_shapes(heads, kv_heads, head_dim, dtype):
    """Blocks of 16 and head sizes that are multiples of 16: the vectorized path, with
    query groups of 3, of 10 (more than one tile of 8) and of 1; partial last blocks."""
    lengths = [1, 16, 17, 100, 333]
    k_cache, v_cache, tables, seqs = paged_sequences(lengths, dtype, bs=16, kvh=kv_heads, d=head_dim)
    q = torch.randn(len(lengths), heads, head_dim).to(dtype)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out = paged_decode_attention(q, k_cache, v_cache, table, torch.tensor(lengths), 1 / math.sqrt(head_dim))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (k, v) in enumerate(seqs):
        ref = attention_one_sequence(q[i:i + 1], k, v, num_context=len(k) - 1)
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_decode_step_op_equals_the_python_one(dtype):
    """``xllm_cpu::decode_attention`` (what compiled decode graphs call): the same K/V stored
    in the same slots and the same output as the Python op, also inside a compiled graph."""
    from xllm_ops import decode_attention
    from xllm_ops.paged_attention import decode_attention_torch

    lengths = [1, 17, 40]
    caches = paged_sequences(lengths, dtype, bs=16, kvh=4, d=64)
    k_cache, v_cache, tables = caches[0], caches[1], caches[2]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, 64, generator=g).to(dtype) for n in (12, 4, 4))
    slots = torch.tensor([t[(n - 1) // 16] * 16 + (n - 1) % 16 for t, n in zip(tables, lengths)])
    lens = torch.tensor(lengths)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = decode_attention_torch(q, k, v, ref_k, ref_v, slots, table, lens, 0.125)
    compiled = torch.compile(decode_attention, fullgraph=True)
    for fn in (decode_attention, compiled):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = fn(q, k, v, kc, vc, slots, table, lens, 0.125)
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("context,chunk", [(0, 7), (5, 1), (8, 6), (13, 9)])
def test_paged_prefill_attention_over_cached_context(context, chunk):
    k_cache, v_cache, tables, seqs = paged_sequences([context + chunk])
    k, v = seqs[0]
    q = torch.randn(chunk, H, D)
    out = paged_prefill_attention(q, k_cache, v_cache, torch.tensor(tables[0]), context, 1 / math.sqrt(D))
    ref = attention_one_sequence(q, k, v, num_context=context)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if context == 0:
        torch.testing.assert_close(prefill_attention(q, k, v, 1 / math.sqrt(D)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_packed_linear_matches_f_linear(rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    packed = linear.pack(w)
    # oneDNN packs bf16 only where the CPU has AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
    assert (packed is not None) == (torch.backends.mkldnn.is_available()
                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ref = F.linear(x.float(), w.float(), b.float())
    out = linear.linear(x, w, packed, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)  # bf16 output rounding


def test_packed_linear_inside_a_compiled_graph():
    """A compiled graph reaches the packed weight through the opaque op (no freezing)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g).bfloat16()
    x = torch.randn(5, 64, generator=g).bfloat16()
    packed = linear.pack(w)
    if packed is None or packed.handle is None:
        pytest.skip("no oneDNN packing or no native module here")
    fn = torch.compile(lambda t: torch.relu(linear.linear(t, w, packed)), fullgraph=True)
    torch.testing.assert_close(fn(x).float(), torch.relu(F.linear(x.float(), w.float())), atol=0.1, rtol=0.02)


def test_packing_skips_float32():
    assert linear.pack(torch.randn(4, 4)) is None


def _small_linear_or_skip():
    if not linear._small_op():
        pytest.skip("no AVX-512 BF16 (or no native module) here: decode linears use oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("n, k", [(96, 64), (5, 770), (4099, 256)])
def test_small_linear_matches_f_linear(rows, n, k):
    """The decode kernel: any row count it takes, K with a tail, N not a multiple of 4, a bias."""
    _small_linear_or_skip()
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    out = torch.ops.xllm_cpu.small_linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    # the sum is fp32 over exact bf16 products; only the output's bf16 rounding differs
    torch.testing.assert_close(out.float(), ref, atol=1e-3 * math.sqrt(k), rtol=8e-3)


def test_small_linear_rows_do_not_depend_on_the_batch():
    """A sequence's decode logits are the same whichever other rows share its step."""
    _small_linear_or_skip()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 768, generator=g).bfloat16()
    x = torch.randn(16, 768, generator=g).bfloat16()
    alone = torch.cat([torch.ops.xllm_cpu.small_linear(x[i:i + 1], w, None) for i in range(16)])
    assert torch.equal(torch.ops.xllm_cpu.small_linear(x, w, None), alone)


def test_small_linear_serves_decode_rows_in_and_out_of_a_graph():
    _small_linear_or_skip()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=g).bfloat16()
    x = torch.randn(linear.SMALL_ROWS, 64, generator=g).bfloat16()
    packed = linear.pack(w)
    ref = torch.ops.xllm_cpu.small_linear(x, w, None)
    assert torch.equal(linear.linear(x, w, packed), ref)
    fn = torch.compile(lambda t: linear.linear(t, w, packed), fullgraph=True)
    assert torch.equal(fn(x), ref)
