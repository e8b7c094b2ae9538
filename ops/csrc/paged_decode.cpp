// Paged decode attention for CPUs: one query token per sequence, reading K/V blocks in
// place (no gather of the context), an online softmax per block, parallel over
// (sequence, KV head) pairs. The query heads that share a KV head are done together so
// each K/V element is read once for all of them.
//
// Layouts (see ops/paged_attention.py): k_cache (N, KVH, D, BS) -- each block's keys of
// one head stored transposed, so a block's scores are a sum over d of (q[d] x a row of
// BS keys) and vectorize over tokens with no horizontal sums; v_cache (N, KVH, BS, D).
// q: (B, H, D); block_tables: (B, M) int64; seq_lens: (B,) int64. Returns (B, H, D) in
// q's dtype. float32 or bfloat16 caches.
//
// With AVX-512 and BS == 16 (one float vector per block row) an intrinsics path runs;
// anything else takes the portable loops below, which compute the same thing.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2
#endif
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Widen n values to float. bfloat16 is the top half of a float32.
inline void widen(const float* __restrict__ src, float* __restrict__ dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void widen(const at::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// x[i] = exp(x[i] - m), written so the compiler vectorizes it: 2^t with t split into an
// integer part (put straight into the float's exponent bits) and a fraction in [0, 1)
// done by a degree-6 polynomial (relative error about 2e-7, float rounding). Inputs
// below -87 give about 1e-38 instead of denormals; -inf gives the same.
inline void exp_shifted(float* __restrict__ x, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::max(x[i] - m, -87.0f) * 1.44269504088896341f;
    const float whole = std::floor(t);
    const float f = t - whole;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;
    float two_whole;
    std::memcpy(&two_whole, &bits, sizeof(float));
    x[i] = p * two_whole;
  }
}

// Per (sequence, KV head) running state of the online softmax.
struct Softmax {
  std::vector<float> q, acc, mx, sum, p;  // q, acc: (G, D); mx, sum: (G,); p: (G, BS)
  Softmax(int64_t G, int64_t D, int64_t BS) : q(G * D), acc(G * D), mx(G), sum(G), p(G * BS) {}

  template <typename QT>
  void start(const QT* qrow, int64_t G, int64_t D, float scale) {
    widen(qrow, q.data(), G * D);
    for (auto& x : q) x *= scale;
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(mx.begin(), mx.end(), kNegInf);
    std::fill(sum.begin(), sum.end(), 0.f);
  }

  // Turn head g's raw scores p[g] (n valid of BS) into weights, rescaling acc[g].
  void weigh(int64_t g, int64_t n, int64_t BS, int64_t D) {
    float* s = p.data() + g * BS;
    float m_new = mx[g];
    for (int64_t t = 0; t < n; ++t) m_new = std::max(m_new, s[t]);
    if (m_new != mx[g]) {
      float rescale = mx[g] - m_new;
      exp_shifted(&rescale, 1, 0.f);
      float* a = acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
      sum[g] *= rescale;
      mx[g] = m_new;
    }
    exp_shifted(s, n, m_new);
    for (int64_t t = n; t < BS; ++t) s[t] = 0.f;
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) total += s[t];
    sum[g] += total;
  }

  template <typename QT>
  void finish(QT* orow, int64_t G, int64_t D) const {
    for (int64_t g = 0; g < G; ++g) {
      const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
      for (int64_t d = 0; d < D; ++d) orow[g * D + d] = static_cast<QT>(acc[g * D + d] * inv);
    }
  }
};

// -- portable block step -----------------------------------------------------------------
template <typename CT>
void block_portable(Softmax& st, const CT* kb, const CT* vb, int64_t n, int64_t G, int64_t D,
                    int64_t BS, std::vector<float>& row) {
  std::fill(st.p.begin(), st.p.end(), 0.f);
  for (int64_t d = 0; d < D; ++d) {  // scores: sum over d of q[g][d] * K^T[d][:]
    widen(kb + d * BS, row.data(), BS);
    for (int64_t g = 0; g < G; ++g) {
      const float qd = st.q[g * D + d];
      float* __restrict__ s = st.p.data() + g * BS;
      for (int64_t t = 0; t < BS; ++t) s[t] += qd * row[t];
    }
  }
  for (int64_t g = 0; g < G; ++g) st.weigh(g, n, BS, D);
  for (int64_t t = 0; t < n; ++t) {
    widen(vb + t * D, row.data(), D);
    for (int64_t g = 0; g < G; ++g) {
      const float w = st.p[g * BS + t];
      float* __restrict__ a = st.acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += w * row[d];
    }
  }
}

#if defined(__AVX512F__)
// -- AVX-512 block step, BS == 16 ------------------------------------------------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Scores of GN query heads (GN <= 8) against one block: GN accumulators stay in registers.
template <int GN, typename CT>
inline void scores16(const float* q, int64_t D, const CT* kb, float* out) {
  __m512 acc[GN];
  for (int j = 0; j < GN; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k = load16(kb + d * 16);
    for (int j = 0; j < GN; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * D + d]), k, acc[j]);
  }
  for (int j = 0; j < GN; ++j) _mm512_storeu_ps(out + j * 16, acc[j]);
}

// acc[g][c*16 .. c*16+15] += sum over t of p[g][t] * V[t][same], GN heads in registers.
template <int GN, typename CT>
inline void values16(const float* p, int64_t n, int64_t D, const CT* vb, float* acc) {
  for (int64_t c = 0; c < D; c += 16) {
    __m512 a[GN];
    for (int j = 0; j < GN; ++j) a[j] = _mm512_loadu_ps(acc + j * D + c);
    for (int64_t t = 0; t < n; ++t) {
      const __m512 v = load16(vb + t * D + c);
      for (int j = 0; j < GN; ++j) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * 16 + t]), v, a[j]);
    }
    for (int j = 0; j < GN; ++j) _mm512_storeu_ps(acc + j * D + c, a[j]);
  }
}

template <typename CT>
void block_avx512(Softmax& st, const CT* kb, const CT* vb, int64_t n, int64_t G, int64_t D) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const float* q = st.q.data() + g0 * D;
    float* s = st.p.data() + g0 * 16;
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: scores16<1>(q, D, kb, s); break;
      case 2: scores16<2>(q, D, kb, s); break;
      case 3: scores16<3>(q, D, kb, s); break;
      case 4: scores16<4>(q, D, kb, s); break;
      case 5: scores16<5>(q, D, kb, s); break;
      case 6: scores16<6>(q, D, kb, s); break;
      case 7: scores16<7>(q, D, kb, s); break;
      default: scores16<8>(q, D, kb, s); break;
    }
  }
  for (int64_t g = 0; g < G; ++g) st.weigh(g, n, 16, D);
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const float* p = st.p.data() + g0 * 16;
    float* a = st.acc.data() + g0 * D;
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: values16<1>(p, n, D, vb, a); break;
      case 2: values16<2>(p, n, D, vb, a); break;
      case 3: values16<3>(p, n, D, vb, a); break;
      case 4: values16<4>(p, n, D, vb, a); break;
      case 5: values16<5>(p, n, D, vb, a); break;
      case 6: values16<6>(p, n, D, vb, a); break;
      case 7: values16<7>(p, n, D, vb, a); break;
      default: values16<8>(p, n, D, vb, a); break;
    }
  }
}
#endif

template <typename QT, typename CT>
void decode_kernel(const QT* q, const CT* kc, const CT* vc, const int64_t* tables, const int64_t* lens,
                   QT* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t M,
                   float scale) {
  const int64_t G = H / KVH;
#if defined(__AVX512F__)
  const bool fast = BS == 16 && D % 16 == 0;
#else
  const bool fast = false;
#endif
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    Softmax st(G, D, BS);
    std::vector<float> row(std::max(BS, D));
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / KVH, kh = pair % KVH;
      const int64_t len = lens[b];
      st.start(q + (b * H + kh * G) * D, G, D, scale);
      for (int64_t blk = 0; blk * BS < len; ++blk) {
        const int64_t block = tables[b * M + blk];
        const int64_t n = std::min(BS, len - blk * BS);
        const CT* kb = kc + (block * KVH + kh) * D * BS;
        const CT* vb = vc + (block * KVH + kh) * BS * D;
#if defined(__AVX512F__)
        if (fast) {
          // blocks sit anywhere in memory, so the hardware prefetcher cannot guess the
          // next one: fetch PREFETCH_AHEAD blocks ahead (the first ones at blk == 0)
          for (int64_t ahead = blk == 0 ? 1 : PREFETCH_AHEAD; ahead <= PREFETCH_AHEAD; ++ahead) {
            if ((blk + ahead) * BS >= len) break;
            const int64_t next = (tables[b * M + blk + ahead] * KVH + kh) * D * BS;
            const char* nk = reinterpret_cast<const char*>(kc + next);
            const char* nv = reinterpret_cast<const char*>(vc + next);
            for (int64_t off = 0; off < D * BS * static_cast<int64_t>(sizeof(CT)); off += 64) {
              _mm_prefetch(nk + off, _MM_HINT_T0);
              _mm_prefetch(nv + off, _MM_HINT_T0);
            }
          }
          block_avx512(st, kb, vb, n, G, D);
          continue;
        }
#endif
        block_portable(st, kb, vb, n, G, D, BS, row);
      }
      st.finish(out + (b * H + kh * G) * D, G, D);
    }
  });
  (void)fast;
}

}  // namespace

template <typename E>  // E: an unsigned integer of the element's size (the bits are copied)
void store_kv_typed(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k,
                    const torch::Tensor& v, const int64_t* slots, int64_t T, int64_t KVH, int64_t D,
                    int64_t BS) {
  E* kc = static_cast<E*>(k_cache.data_ptr());
  E* vc = static_cast<E*>(v_cache.data_ptr());
  const E* kp = static_cast<const E*>(k.data_ptr());
  const E* vp = static_cast<const E*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t block = slots[t] / BS, off = slots[t] % BS;
    for (int64_t h = 0; h < KVH; ++h) {
      const E* ks = kp + (t * KVH + h) * D;
      const int64_t tile = (block * KVH + h) * D * BS;  // the (block, head) tile
      for (int64_t d = 0; d < D; ++d) kc[tile + d * BS + off] = ks[d];  // K: column `off` of (D, BS)
      std::memcpy(vc + tile + off * D, vp + (t * KVH + h) * D, D * sizeof(E));  // V: row `off` of (BS, D)
    }
  }
}

// Store T new keys and values (T, KVH, D) at flat slots (block * BS + offset) of the
// caches, keys transposed per block. Same dtype as the caches (the caller converts).
void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots) {
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "store_kv: new K/V must have the caches' dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  k = k.contiguous();
  v = v.contiguous();
  auto s = slots.to(torch::kLong).contiguous();
  const int64_t T = k.size(0), KVH = k_cache.size(1), D = k_cache.size(2), BS = k_cache.size(3);
  TORCH_CHECK(k.size(1) == KVH && k.size(2) == D && v.sizes() == k.sizes(), "store_kv: shapes do not match");
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * BS;
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv: slot ", sp[t], " outside the cache");
  if (k.element_size() == 2) {
    store_kv_typed<uint16_t>(k_cache, v_cache, k, v, sp, T, KVH, D, BS);
  } else {
    TORCH_CHECK(k.element_size() == 4, "store_kv: 2- or 4-byte elements");
    store_kv_typed<uint32_t>(k_cache, v_cache, k, v, sp, T, KVH, D, BS);
  }
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "q (B,H,D), k_cache (N,KVH,D,BS), v_cache (N,KVH,BS,D)");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ in dtype");
  q = q.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = seq_lens.to(torch::kLong).contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), BS = k_cache.size(3), M = tables.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D, "head shapes do not match");
  TORCH_CHECK(v_cache.size(1) == KVH && v_cache.size(2) == BS && v_cache.size(3) == D,
              "v_cache must be (N, KVH, BS, D) beside k_cache (N, KVH, D, BS)");
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

namespace {

// One decode step of a layer, as the op a compiled graph calls: store the new K/V at
// their slots, then attend. Registered as xllm_cpu::decode_attention, so a graph calls
// it without going through Python (a Python custom op costs about 0.1 ms a call here).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  store_kv(k_cache, v_cache, k.to(k_cache.scalar_type()), v.to(v_cache.scalar_type()), slots);
  return paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xllm_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(xllm_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
