// fastfa._C: loading it registers the ops (ops_registration.cpp); build_info() tells
// what this binary was built with, so `fastfa info` and a mismatch warning can say it;
// LayerCall (layer_call.cpp) is a module's resolved op call, the per-step host path.
#include "fastfa/dispatch.h"
#include "fastfa/fallbacks.h"

#include <torch/extension.h>
#include <torch/version.h>

#ifdef FASTFA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastfa {
void bind_layer_call(pybind11::module_& m); // layer_call.cpp
void bind_direct_feedback(pybind11::module_& m); // direct_feedback_join.cpp
} // namespace fastfa

#define FASTFA_STRINGIFY_(x) #x
#define FASTFA_STRINGIFY(x) FASTFA_STRINGIFY_(x)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef FASTFA_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_arch_list"] = FASTFA_STRINGIFY(FASTFA_CUDA_ARCH_LIST); // '_' separates architectures
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_arch_list"] = "";
#endif
#ifdef FASTFA_WITH_FUSED_CUDA
  info["fused_cuda"] = true; // the cuda backend's tensor-core GEMMs (needs the CUTLASS / CuTe headers)
#else
  info["fused_cuda"] = false;
#endif
#if AT_PARALLEL_OPENMP
  info["parallel"] = "openmp";
#else
  info["parallel"] = "native";
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

pybind11::list fallbacks() {
  pybind11::list records;
  for (const fastfa::Fallback& record : fastfa::recorded_fallbacks()) {
    records.append(pybind11::make_tuple(record.op, record.backend, record.reason, record.count));
  }
  return records;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastfa's compiled kernels; the ops live in torch.ops.fastfa";
  m.def("build_info", &build_info, "What this binary was built with: torch and CUDA versions, architectures");
  // The fallback record (csrc/fallbacks.cpp), read and written through fastfa._backend.
  m.def("_record_fallback", &fastfa::record_fallback, pybind11::arg("op"), pybind11::arg("reason"),
        pybind11::arg("backend") = "aten");
  m.def("_fallbacks", &fallbacks, "[(op, backend, reason, count)] since the last clear, in the order first seen");
  m.def("_clear_fallbacks", &fastfa::clear_fallbacks);
  // The cuda backend's per-pass choice (csrc/dispatch.cpp), set and checked through fastfa._backend.
  m.def("_set_cuda_fused", &fastfa::set_cuda_fused_passes, pybind11::arg("fused"));
  m.def("_cuda_fused", &fastfa::cuda_fused_passes);
  m.def(
      "_set_auto_costs",
      [](double bf16, double fp16, double fp32, double bandwidth_tbs, double launch_us, double usf, double brsf,
         double frsf, double fa, double nchw_factor) {
        fastfa::set_auto_costs({bf16, fp16, fp32, bandwidth_tbs, launch_us, usf, brsf, frsf, fa, nchw_factor});
      },
      "The cost model's constants: peak TFLOP/s (bf16, fp16, fp32), TB/s, launch µs, the cuda fused grad_input's "
      "fractions (usf, brsf, frsf, drawn fa), the NCHW conv2d factor");
  m.def(
      "_fused_grad_input_pays",
      [](int64_t transform, int64_t rows, int64_t weight_numel, at::ScalarType dtype, bool nchw) {
        return fastfa::fused_grad_input_pays(static_cast<fastfa::Rule>(transform), rows, weight_numel, dtype, nchw);
      },
      pybind11::arg("transform"), pybind11::arg("rows"), pybind11::arg("weight_numel"), pybind11::arg("dtype"),
      pybind11::arg("nchw") = false);
  fastfa::bind_layer_call(m);
  fastfa::bind_direct_feedback(m);
}
