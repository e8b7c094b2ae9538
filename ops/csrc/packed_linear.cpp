// A linear layer over a oneDNN-packed weight, callable from a compiled graph.
//
// A packed weight is an opaque (mkldnn-layout) tensor that a traced graph cannot take as
// an input, so each one is registered here once and named by an integer handle; the op
// xllm_cpu::packed_linear(x, weight, handle, bias) runs oneDNN's linear on the packed
// copy. ``weight`` is the plain weight: it gives the traced graph the output shape and is
// otherwise unused. This lets decode graphs be compiled without weight freezing, so
// inductor's on-disk graph cache works and a restart loads graphs instead of rebuilding
// them, while the matmuls still run from packed weights.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <mutex>
#include <vector>

namespace {

std::vector<at::Tensor>& registry() {
  static std::vector<at::Tensor> packed;
  return packed;
}
std::mutex registry_mutex;

}  // namespace

int64_t register_packed(at::Tensor packed) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back(std::move(packed));
  return static_cast<int64_t>(registry().size()) - 1;
}

namespace {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, int64_t handle,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry().size()),
              "packed_linear: unknown weight handle ", handle);
  const at::Tensor& packed = registry()[handle];
  TORCH_CHECK(packed.sizes() == weight.sizes(), "packed_linear: handle ", handle, " holds a ",
              packed.sizes(), " weight, the layer's is ", weight.sizes());
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY(xllm_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor weight, int handle, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(xllm_cpu, CPU, m) {
  m.impl("packed_linear", &packed_linear);
}
