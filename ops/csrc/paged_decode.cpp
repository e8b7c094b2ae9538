// Paged decode attention for CPUs: one query token per sequence, reading K/V blocks in
// place (no gather of the context), an online softmax per block, OpenMP over
// (sequence, KV head) pairs. The query heads that share a KV head are done together so
// each K/V row is read once for all of them.
//
// q: (B, H, D); k_cache, v_cache: (N, BS, KVH, D); block_tables: (B, M) int64;
// seq_lens: (B,) int64. Returns (B, H, D) in q's dtype. float32 or bfloat16 caches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Widen n values to float. bfloat16 is the top half of a float32, so the shift
// vectorizes; float32 is a copy.
static inline void widen(const float* __restrict__ src, float* __restrict__ dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
static inline void widen(const at::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <typename QT, typename CT>
static void decode_kernel(const QT* q, const CT* kc, const CT* vc, const int64_t* tables,
                          const int64_t* lens, QT* out, int64_t B, int64_t H, int64_t KVH,
                          int64_t D, int64_t BS, int64_t M, float scale) {
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), mx(G), sum(G), scores(G * BS), kf(BS * D), vf(BS * D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / KVH, kh = pair % KVH;
      const int64_t len = lens[b];
      for (int64_t g = 0; g < G; ++g) {
        widen(q + (b * H + kh * G + g) * D, qf.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
        mx[g] = -std::numeric_limits<float>::infinity();
        sum[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk * BS < len; ++blk) {
        const int64_t block = tables[b * M + blk];
        const int64_t n = std::min(BS, len - blk * BS);
        for (int64_t t = 0; t < n; ++t) {  // this block's rows of this KV head, as floats
          widen(kc + ((block * BS + t) * KVH + kh) * D, kf.data() + t * D, D);
          widen(vc + ((block * BS + t) * KVH + kh) * D, vf.data() + t * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qg = qf.data() + g * D;
          float* __restrict__ sg = scores.data() + g * BS;
          float m_new = mx[g];
          for (int64_t t = 0; t < n; ++t) {
            const float* __restrict__ kt = kf.data() + t * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kt[d];
            sg[t] = s;
            m_new = std::max(m_new, s);
          }
          float* __restrict__ a = acc.data() + g * D;
          const float rescale = std::exp(mx[g] - m_new);
          if (rescale != 1.f) {
            for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
            sum[g] *= rescale;
          }
          mx[g] = m_new;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(sg[t] - m_new);
            sum[g] += p;
            const float* __restrict__ vt = vf.data() + t * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vt[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        QT* orow = out + (b * H + kh * G + g) * D;
        const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<QT>(acc[g * D + d] * inv);
      }
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q (B,H,D), caches (N,BS,KVH,D)");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ in dtype");
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = seq_lens.to(torch::kLong).contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), M = tables.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D, "head shapes do not match");
  auto out = torch::empty_like(q);
  const float s = static_cast<float>(scale);
#define XLLM_DISPATCH(QT, CT)                                                                  \
  decode_kernel<QT, CT>(q.data_ptr<QT>(), k_cache.data_ptr<CT>(), v_cache.data_ptr<CT>(),      \
                        tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<QT>(), \
                        B, H, KVH, D, BS, M, s)
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  if (qt == torch::kFloat && ct == torch::kFloat) XLLM_DISPATCH(float, float);
  else if (qt == torch::kBFloat16 && ct == torch::kBFloat16) XLLM_DISPATCH(at::BFloat16, at::BFloat16);
  else if (qt == torch::kFloat && ct == torch::kBFloat16) XLLM_DISPATCH(float, at::BFloat16);
  else if (qt == torch::kBFloat16 && ct == torch::kFloat) XLLM_DISPATCH(at::BFloat16, float);
  else TORCH_CHECK(false, "paged_decode supports float32 and bfloat16");
#undef XLLM_DISPATCH
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU)");
}
