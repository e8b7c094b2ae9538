// Linear layers for a few rows (decode) in float32 on AVX2 + FMA: y = x @ w.T + b with
// x (M, K), w (N, K) in its checkpoint layout, y (M, N), all float32, M <= 16.
//
// As for the bfloat16 kernel (gemv.cpp), a decode step's linear is a stream over the
// weight, so what counts is the rate at which the weight is read. On CPUs without
// AVX-512 the float32 matrix-vector products torch reaches here read the weight at about
// a third of the machine's bandwidth; this kernel reads each weight row once, in order,
// several rows side by side (each a sequential stream the hardware prefetcher follows),
// with 8-wide fused multiply-adds, the rows split over the threads.
//
// Each output element is summed in the same order whatever M is (per 8-lane accumulator
// over K, then the lanes pairwise), so a row's result does not depend on which other rows
// share the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)

constexpr int64_t kLanes = 8;  // floats per 256-bit vector

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// out[m, r] for m in [0, MT) and r in [0, R): x rows at x (stride K), weight rows at w.
template <int MT, int R>
inline void tile(const float* __restrict__ x, const float* __restrict__ w, int64_t K,
                 const float* __restrict__ bias, float* __restrict__ out, int64_t N) {
  __m256 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t body = K - K % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float y = hsum(acc[m][r]);
      for (int64_t k = body; k < K; ++k) y += x[m * K + k] * w[r * K + k];
      if (bias != nullptr) y += bias[r];
      out[m * N + r] = y;
    }
}

// Up to 12 accumulators: 8 weight rows against one input row, 4 against two or more.
template <int R>
void rows_block(const float* x, int64_t M, const float* w, int64_t K, const float* bias, float* out,
                int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile<2, R>(x + m * K, w, K, bias, out + m * N, N);
  if (m < M) tile<1, R>(x + m * K, w, K, bias, out + m * N, N);
}

template <int R>
void one_row(const float* x, const float* w, int64_t K, const float* bias, float* out, int64_t N) {
  tile<1, R>(x, w, K, bias, out, N);
}

#endif  // AVX2 and FMA

at::Tensor small_linear_f32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#if defined(__AVX2__) && defined(__FMA__)
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "small_linear_f32: float32 x and weight");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "small_linear_f32: x (..., K), weight (N, K)");
  const int64_t K = weight.size(1), N = weight.size(0);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto w = weight.contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= 16, "small_linear_f32: at most 16 rows, got ", M);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto out = at::empty(shape, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t rows = M == 1 ? 8 : 4;  // weight rows per tile
  const int64_t tiles = (N + rows - 1) / rows;
  // NOTE: a grain of at least 16 tiles keeps tiny layers on one thread
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * rows;
      const int64_t r = std::min(rows, N - n);
      const float* bn = bp != nullptr ? bp + n : nullptr;
      if (M == 1 && r == 8) {
        one_row<8>(xp, wp + n * K, K, bn, op + n, N);
        continue;
      }
      for (int64_t done = 0; done < r;) {  // 4 rows at a time, then the rest
        const int64_t step = std::min<int64_t>(4, r - done);
        const float* wn = wp + (n + done) * K;
        const float* bd = bn != nullptr ? bn + done : nullptr;
        float* od = op + n + done;
        switch (step) {
          case 4: rows_block<4>(xp, M, wn, K, bd, od, N); break;
          case 3: rows_block<3>(xp, M, wn, K, bd, od, N); break;
          case 2: rows_block<2>(xp, M, wn, K, bd, od, N); break;
          default: rows_block<1>(xp, M, wn, K, bd, od, N); break;
        }
        done += step;
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "small_linear_f32 needs AVX2 and FMA");
#endif
}

}  // namespace

bool small_linear_f32_available() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(xllm_cpu, m) {
  m.def("small_linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(xllm_cpu, CPU, m) {
  m.impl("small_linear_f32", &small_linear_f32);
}
