// Linear layers over Q8_0 weights (GGUF's 8-bit format): y = x @ dequant(W).T + b.
//
// x (M, K) bfloat16 or float32; W as two arrays, values (N, K) int8 and scales (N, K / 32)
// float16, W[n, k] = values[n, k] * scales[n, k / 32] -- exactly the numbers of GGUF's 34-byte
// Q8_0 blocks (a float16 scale, then 32 int8 values), split apart at load; bias (N) or none;
// y (M, N) in x's dtype.
//
// Each call first quantizes x the same way, per row and per 32-value block: a float32 scale
// max|x_b| / 127 and int8 values round(x_b / scale) (activation quantization: the only error
// beyond float rounding, bounded in xllm_ops.q8_linear). A block's dot product of two int8
// vectors is then exact in int32; it is scaled by the two blocks' scales and summed in float32.
//
// The products use AVX2's u8 x s8 multiply-add (vpmaddubsw, pairs summed in int16, then
// vpmaddwd sums pairs into int32 lanes): the unsigned operand is |w| and the signed one is x
// carrying w's sign, so every term is w * x exactly (a -128 weight too: |-128| is 128 as u8,
// and 2 * 128 * 127 < 2^15 never saturates). One 256-bit register holds one block, so the
// block's scale is a broadcast. Four weight rows are done together against one or two input
// rows; more input rows are taken two at a time over the same four weight rows, then in L1.
// Rows are split over the threads in runs of whole tiles, and each thread reads its weight
// rows in memory order, prefetching a few tiles ahead.
//
// Each output element is summed in the same order whatever M is, so a row's result does not
// depend on the other rows of the batch. Without AVX2, FMA and F16C the op is not registered
// with a kernel and callers dequantize and use F.linear (xllm_ops.q8_linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XLLM_Q8_AVX2 1
#include <immintrin.h>
#endif

namespace {

#if defined(XLLM_Q8_AVX2)

#ifndef XLLM_Q8_AHEAD
#define XLLM_Q8_AHEAD 2
#endif
constexpr int64_t kBlock = 32;  // values per Q8_0 block
constexpr int64_t kRows = 4;    // weight rows per tile
constexpr int64_t kChunk = 64;  // blocks whose combined scales are computed at once

// 8 consecutive inputs as float32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of x as Q8 blocks: q (K) int8, d (K / 32) float32 scales.
template <typename T>
void quantize_row(const T* __restrict__ x, int64_t K, int8_t* __restrict__ q, float* __restrict__ d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(x + b * kBlock + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float m = hmax(amax);
    d[b] = m / 127.0f;
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // round to nearest
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), _mm256_permutevar8x32_epi32(packed, order));
  }
}

// out[m][r] = sum over blocks b of (w_r,b . x_m,b) * dw_r,b * dx_m,b, for MT input rows and
// R weight rows. The combined scales dw * dx of a chunk of blocks are computed first, 8 at a
// time, so the loop over blocks is: the int8 dot (sign, multiply-add twice), its conversion
// to float32, and one multiply-add by the block's scale.
template <int MT, int R>
inline void tile(const int8_t* __restrict__ xq, const float* __restrict__ xd, int64_t K,
                 const int8_t* __restrict__ w, const uint16_t* __restrict__ ws, float out[][kRows]) {
  const int64_t nb = K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float scale[MT][R][kChunk];
  __m256 acc[MT][R];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nb; c += kChunk) {
    const int64_t cn = std::min(kChunk, nb - c);
    for (int r = 0; r < R; ++r) {
      const uint16_t* wsr = ws + r * nb + c;
      int64_t j = 0;
      for (; j + 8 <= cn; j += 8) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wsr + j)));
        for (int m = 0; m < MT; ++m)
          _mm256_store_ps(&scale[m][r][j], _mm256_mul_ps(dw, _mm256_loadu_ps(xd + m * nb + c + j)));
      }
      for (; j < cn; ++j)
        for (int m = 0; m < MT; ++m) scale[m][r][j] = _cvtsh_ss(wsr[j]) * xd[m * nb + c + j];
    }
    for (int64_t j = 0; j < cn; ++j) {
      const int64_t b = c + j;
      __m256i xv[MT];
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * kBlock));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* wr = w + r * K + b * kBlock;
        if ((b & 1) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(wr + XLLM_Q8_AHEAD * kRows * K), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
        const __m256i wa = _mm256_abs_epi8(wv);  // as u8: |-128| is 128
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv[m], wv)), ones);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&scale[m][r][j]), acc[m][r]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) out[m][r] = hsum(acc[m][r]);
}

template <int R, typename T>
void rows_block(const int8_t* xq, const float* xd, int64_t M, const int8_t* w, const uint16_t* ws, int64_t K,
                const float* bias, T* out, int64_t N) {
  float sums[2][kRows];
  for (int64_t m = 0; m < M; m += 2) {
    const int64_t nb = K / kBlock;
    const int mt = M - m >= 2 ? 2 : 1;
    if (mt == 2) tile<2, R>(xq + m * K, xd + m * nb, K, w, ws, sums);
    else tile<1, R>(xq + m * K, xd + m * nb, K, w, ws, sums);
    for (int i = 0; i < mt; ++i)
      for (int r = 0; r < R; ++r) out[(m + i) * N + r] = T(sums[i][r] + (bias != nullptr ? bias[r] : 0.0f));
  }
}

template <typename T>
void run(const T* x, int64_t M, const int8_t* w, const uint16_t* ws, int64_t N, int64_t K, const float* bias,
         T* out) {
  const int64_t nb = K / kBlock;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * nb);
  // NOTE: up to 16 rows (decode) are quantized on the calling thread, without a parallel region
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(x + m * K, K, xq.data() + m * K, xd.data() + m * nb);
  });
  const int64_t tiles = (N + kRows - 1) / kRows;
  // NOTE: a grain of at least 16 tiles keeps tiny layers on one thread
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kRows;
      const float* bn = bias != nullptr ? bias + n : nullptr;
      switch (std::min(kRows, N - n)) {
        case 4: rows_block<4>(xq.data(), xd.data(), M, w + n * K, ws + n * nb, K, bn, out + n, N); break;
        case 3: rows_block<3>(xq.data(), xd.data(), M, w + n * K, ws + n * nb, K, bn, out + n, N); break;
        case 2: rows_block<2>(xq.data(), xd.data(), M, w + n * K, ws + n * nb, K, bn, out + n, N); break;
        default: rows_block<1>(xq.data(), xd.data(), M, w + n * K, ws + n * nb, K, bn, out + n, N); break;
      }
    }
  });
}

#endif  // XLLM_Q8_AVX2

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
#if defined(XLLM_Q8_AVX2)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "q8_linear: bfloat16 or float32 x");
  TORCH_CHECK(values.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "q8_linear: int8 values and float16 scales");
  TORCH_CHECK(values.dim() == 2 && x.size(-1) == values.size(1), "q8_linear: x (..., K), values (N, K)");
  const int64_t N = values.size(0), K = values.size(1);
  TORCH_CHECK(K % kBlock == 0, "q8_linear: K must be a multiple of 32, got ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / kBlock,
              "q8_linear: scales (N, K / 32)");
  auto x2 = x.reshape({-1, K}).contiguous();
  auto w = values.contiguous();
  auto ws = scales.contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto out = at::empty(shape, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(ws.data_ptr<at::Half>());
  if (M == 0) return out;
  if (x.scalar_type() == at::kFloat)
    run(x2.data_ptr<float>(), M, wp, sp, N, K, bp, out.data_ptr<float>());
  else
    run(x2.data_ptr<at::BFloat16>(), M, wp, sp, N, K, bp, out.data_ptr<at::BFloat16>());
  return out;
#else
  TORCH_CHECK(false, "q8_linear needs AVX2, FMA and F16C");
#endif
}

}  // namespace

bool q8_linear_available() {
#if defined(XLLM_Q8_AVX2)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(xllm_cpu, m) {
  m.def("q8_linear(Tensor x, Tensor values, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(xllm_cpu, CPU, m) {
  m.impl("q8_linear", &q8_linear);
}
