// The Python module of the CPU kernels: one binding per C++ entry point.
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
int64_t register_packed(at::Tensor packed);
bool small_linear_available();
bool small_linear_f32_available();
bool q8_linear_available();
void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU)");
  m.def("store_kv", &store_kv, "write new K/V into the paged caches (CPU)");
  m.def("small_linear_available", &small_linear_available, "whether xllm_cpu::small_linear is built (AVX-512 BF16)");
  m.def("small_linear_f32_available", &small_linear_f32_available,
        "whether xllm_cpu::small_linear_f32 is built (AVX2 and FMA)");
  m.def("q8_linear_available", &q8_linear_available, "whether xllm_cpu::q8_linear is built (AVX2, FMA, F16C)");
  m.def("register_packed", &register_packed, "keep a oneDNN-packed weight; returns its handle");
}
