// Linear layers for a few rows (decode): y = x @ w.T + b with x (M, K) bfloat16, M <= 16,
// w (N, K) bfloat16 in its checkpoint layout, y (M, N) bfloat16.
//
// At M = 1..16 a linear is a stream over the weight: each weight element is used M times,
// far too few to be limited by arithmetic, so the speed is the rate at which the weight is
// read. oneDNN's GEMM reaches about 55 GB/s on a whole-model sweep here but costs a
// primitive lookup per call; this kernel reads each weight row once, in order, with the
// AVX-512 BF16 dot product (vdpbf16ps: pairs of bf16 products summed into fp32 lanes), the
// rows split over the threads. Four weight rows are done together against up to four
// input rows (16 accumulators); more input rows are taken four at a time over the same
// four weight rows, which are then in L1.
//
// Each output element is summed in the same order whatever M is, so a row's result does
// not depend on which other rows share the batch. Without AVX-512 BF16 the op is not
// registered and callers use oneDNN (xllm_ops.linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512BF16__)

#ifndef XLLM_GEMV_AHEAD
#define XLLM_GEMV_AHEAD 2
#endif
constexpr int64_t kRows = 4;    // weight rows per tile
constexpr int64_t kLanes = 32;  // bf16 elements per 512-bit vector

inline __m512bh load_bf16(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// out[m, n0 + r] for m in [0, MT) and r in [0, R): x rows at x (stride K), weight rows at w.
template <int MT, int R>
inline void tile(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, int64_t K,
                 const float* __restrict__ bias, uint16_t* __restrict__ out, int64_t N) {
  __m512 acc[MT][R];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    const __mmask32 mask = K - k >= kLanes ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = load_bf16(w + r * K + k, mask);
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + XLLM_GEMV_AHEAD * kRows) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load_bf16(x + m * K + k, mask);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float y = _mm512_reduce_add_ps(acc[m][r]);
      if (bias != nullptr) y += bias[r];
      out[m * N + r] = c10::BFloat16(y).x;
    }
}

template <int R>
void rows_block(const uint16_t* x, int64_t M, const uint16_t* w, int64_t K, const float* bias,
                uint16_t* out, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, R>(x + m * K, w, K, bias, out + m * N, N);
  switch (M - m) {
    case 3: tile<3, R>(x + m * K, w, K, bias, out + m * N, N); break;
    case 2: tile<2, R>(x + m * K, w, K, bias, out + m * N, N); break;
    case 1: tile<1, R>(x + m * K, w, K, bias, out + m * N, N); break;
    default: break;
  }
}

#endif  // __AVX512BF16__

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "small_linear: bfloat16 x and weight");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "small_linear: x (..., K), weight (N, K)");
  const int64_t K = weight.size(1), N = weight.size(0);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto w = weight.contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= 16, "small_linear: at most 16 rows, got ", M);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto out = at::empty(shape, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t tiles = (N + kRows - 1) / kRows;
  // NOTE: a grain of at least 16 tiles keeps tiny layers on one thread
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kRows;
      const float* bn = bp != nullptr ? bp + n : nullptr;
      switch (std::min(kRows, N - n)) {
        case 4: rows_block<4>(xp, M, wp + n * K, K, bn, op + n, N); break;
        case 3: rows_block<3>(xp, M, wp + n * K, K, bn, op + n, N); break;
        case 2: rows_block<2>(xp, M, wp + n * K, K, bn, op + n, N); break;
        default: rows_block<1>(xp, M, wp + n * K, K, bn, op + n, N); break;
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "small_linear needs AVX-512 BF16");
#endif
}

}  // namespace

bool small_linear_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(xllm_cpu, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(xllm_cpu, CPU, m) {
  m.impl("small_linear", &small_linear);
}
