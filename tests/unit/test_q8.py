"""Q8_0 weights (``xllm_ops.q8``) and the Q8_0 linear (``xllm_ops.q8_linear``) against their
references: gguf's own quantizer, and a float32 matmul over the dequantized weight."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from xllm_ops import q8, q8_linear
from xllm_ops.reference import q8_linear as reference

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def awkward_matrix(n: int, k: int, seed: int) -> torch.Tensor:
    """Random rows plus the cases a quantizer gets wrong: an all-zero block, exact halves
    after scaling, a block of one repeated value, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 3, n).unsqueeze(1)
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) * 0.25 - 4.0  # with the 63.5 below the scale is 0.5: x.5 ties
    w[1, 0] = 63.5
    w[2, :32] = -1.25
    w[3, 32:64] = torch.linspace(-1, 1, 32) * 1e-30
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_is_gguf_quantize_bit_for_bit(dtype):
    w = awkward_matrix(40, 128, seed=1).to(dtype)
    ours = q8.quantize(w).blocks()
    ref = gguf.quants.quantize(w.float().numpy(), Q8_0)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (40, 4 * 34)
    np.testing.assert_array_equal(ours, ref)


def test_blocks_round_trip_and_dequantize_like_gguf():
    raw = gguf.quants.quantize(awkward_matrix(24, 96, seed=2).numpy(), Q8_0)
    t = q8.from_blocks(raw)
    assert t.values.shape == (24, 96) and t.scales.shape == (24, 3)
    np.testing.assert_array_equal(t.blocks(), raw)
    np.testing.assert_array_equal(t.dequantize().numpy(), gguf.quants.dequantize(raw, Q8_0).reshape(24, 96))
    part = t.narrow(0, 5, 7).narrow(1, 32, 64)
    np.testing.assert_array_equal(part.blocks(), raw[5:12, 34:102])
    with pytest.raises(ValueError, match="whole blocks"):
        t.narrow(1, 16, 32)


def _kernel_or_skip():
    if not q8_linear.kernel_available():
        pytest.skip("no AVX2 (or no native module) here: Q8_0 linears dequantize and use F.linear")


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = q8.quantize(torch.randn(n, k, generator=g))
    w.values[:, :3] = -128  # a file may hold -128 though llama.cpp's quantizer never writes it
    x = (torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 4).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


SHAPES = [(103, 96), (1030, 256), (7, 800), (5, 2336)]


def exact(x: torch.Tensor, w: q8.Q8Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic without float rounding: x rounded to Q8 blocks, then a float64
    matmul; and the float32 rounding the kernel may add to it (sums over K / 32 blocks of
    exact block products: (K / 32 + 2) * 2^-24 of the sum of their magnitudes)."""
    xq = q8.quantize_activations(x).double()
    wd = w.dequantize().double()
    y = xq @ wd.T + (b.double() if b is not None else 0)
    slack = (x.shape[-1] / 32 + 2) * 2.0 ** -24 * (xq.abs() @ wd.abs().T)
    return y, slack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("n, k", SHAPES)
def test_q8_linear_within_its_error_bound(m, n, k, dtype):
    """N not a multiple of the 4-row tile; K of 3, 8, 25 and 73 blocks (the kernel takes the
    scales of 64 blocks at a time, 8 by 8); a bias. Every element is within
    ``q8_linear.error_bound`` of the float32 reference (the stated tolerance), and within
    float rounding of the same arithmetic done exactly (what catches a wrong scale)."""
    _kernel_or_skip()
    x, w, b = _case(m, n, k, dtype, seed=m * n + k)
    out = torch.ops.xllm_cpu.q8_linear(x, w.values, w.scales, b)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = reference(x, w.values, w.scales, b)
    err = (out.float() - ref).abs()
    bound = q8_linear.error_bound(x, w.values, w.scales, ref)
    assert (err <= bound).all(), f"worst error {float((err / bound).max()):.2f}x the bound"
    y, slack = exact(x, w, b)
    tol = slack + (2.0 ** -8 * y.abs() if dtype == torch.bfloat16 else 0)  # + the output's rounding
    assert ((out.double() - y).abs() <= tol).all()


def test_q8_linear_without_bias_and_with_leading_dims():
    _kernel_or_skip()
    x, w, _ = _case(6, 40, 64, torch.bfloat16, seed=5, bias=False)
    out = torch.ops.xllm_cpu.q8_linear(x.view(2, 3, 64), w.values, w.scales, None)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out.view(6, 40), torch.ops.xllm_cpu.q8_linear(x, w.values, w.scales, None))
    ref = reference(x, w.values, w.scales)
    assert ((out.view(6, 40).float() - ref).abs() <= q8_linear.error_bound(x, w.values, w.scales, ref)).all()


def test_q8_linear_rows_do_not_depend_on_the_batch():
    """A sequence's decode logits are the same whichever other rows share its step."""
    _kernel_or_skip()
    x, w, b = _case(9, 300, 768, torch.bfloat16, seed=3)
    alone = torch.cat([torch.ops.xllm_cpu.q8_linear(x[i:i + 1], w.values, w.scales, b) for i in range(9)])
    assert torch.equal(torch.ops.xllm_cpu.q8_linear(x, w.values, w.scales, b), alone)


def test_q8_linear_in_and_out_of_a_compiled_graph():
    _kernel_or_skip()
    x, w, b = _case(4, 96, 128, torch.bfloat16, seed=4)
    eager = q8_linear.linear(x, w.values, w.scales, b)
    assert torch.equal(eager, torch.ops.xllm_cpu.q8_linear(x, w.values, w.scales, b))
    fn = torch.compile(lambda t: torch.relu(q8_linear.linear(t, w.values, w.scales, b)), fullgraph=True)
    assert torch.equal(fn(x), torch.relu(eager))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_the_torch_path_is_the_kernels_arithmetic(n, k, dtype):
    """Without the kernel (no AVX2) x is rounded the same way in torch: within float rounding
    of the same arithmetic done exactly, as the kernel is."""
    x, w, b = _case(5, n, k, dtype, seed=n + k)
    ours = q8_linear.linear_torch(x, w.values, w.scales, b)
    assert ours.dtype == dtype
    y, slack = exact(x, w, b)
    tol = slack * 4 + (2.0 ** -8 * y.abs() if dtype == torch.bfloat16 else 0)  # a float32 matmul
    assert ((ours.double() - y).abs() <= tol).all()
