// fastfa._C: loading it registers the ops (ops_registration.cpp); build_info() tells
// what this binary was built with, so `fastfa info` and a mismatch warning can say it;
// LayerCall (layer_call.cpp) is a module's resolved op call, the per-step host path.
#include "fastfa/fallbacks.h"

#include <torch/extension.h>
#include <torch/version.h>

#ifdef FASTFA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastfa {
void bind_layer_call(pybind11::module_& m); // layer_call.cpp
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
  fastfa::bind_layer_call(m);
}
