// fastfa._C: loading it registers the ops (ops_registration.cpp); build_info() tells
// what this binary was built with, so `fastfa info` and a mismatch warning can say it;
// LayerCall (layer_call.cpp) is a module's resolved op call, the per-step host path.
#include "fastfa/dispatch.h"
#include "fastfa/fallbacks.h"

#include <torch/extension.h>
#include <torch/version.h>

#include <iterator>
#include <optional>
#include <utility>

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

// The cost model's constants by name, the one list fastfa._backend converts AutoCosts through.
constexpr std::pair<const char*, double fastfa::AutoCosts::*> kCostFields[] = {
    {"peak_tflops_bf16", &fastfa::AutoCosts::peak_tflops_bf16},
    {"peak_tflops_fp16", &fastfa::AutoCosts::peak_tflops_fp16},
    {"peak_tflops_fp32", &fastfa::AutoCosts::peak_tflops_fp32},
    {"bandwidth_tbs", &fastfa::AutoCosts::bandwidth_tbs},
    {"launch_us", &fastfa::AutoCosts::launch_us},
    {"cuda_usf", &fastfa::AutoCosts::cuda_usf},
    {"cuda_brsf", &fastfa::AutoCosts::cuda_brsf},
    {"cuda_frsf", &fastfa::AutoCosts::cuda_frsf},
    {"cuda_fa", &fastfa::AutoCosts::cuda_fa},
    {"cuda_bp", &fastfa::AutoCosts::cuda_bp},
    {"triton_usf", &fastfa::AutoCosts::triton_usf},
    {"triton_brsf", &fastfa::AutoCosts::triton_brsf},
    {"triton_frsf", &fastfa::AutoCosts::triton_frsf},
    {"triton_fa", &fastfa::AutoCosts::triton_fa},
    {"triton_bp", &fastfa::AutoCosts::triton_bp},
    {"nchw_factor", &fastfa::AutoCosts::nchw_factor},
};

pybind11::dict auto_costs_fields(bool defaults) {
  const fastfa::AutoCosts costs = defaults ? fastfa::AutoCosts{} : fastfa::auto_costs();
  pybind11::dict fields;
  for (const auto& [name, member] : kCostFields) {
    fields[name] = costs.*member;
  }
  return fields;
}

fastfa::AutoCosts costs_from_fields(const pybind11::dict& fields) {
  TORCH_CHECK_VALUE(pybind11::len(fields) == std::size(kCostFields), "fastfa: the cost model has ",
                    std::size(kCostFields), " constants (the names of _auto_costs()); got ", pybind11::len(fields));
  fastfa::AutoCosts costs;
  for (const auto& [name, member] : kCostFields) {
    TORCH_CHECK_VALUE(fields.contains(name), "fastfa: the cost model's constants lack ", name);
    costs.*member = fields[name].cast<double>();
  }
  return costs;
}

void set_auto_costs_fields(const pybind11::dict& fields) { fastfa::set_auto_costs(costs_from_fields(fields)); }

fastfa::GradInputCase grad_input_case(int64_t rule, int64_t rows, int64_t weight_numel, at::ScalarType dtype,
                                      bool nchw, bool stored_feedback, bool uniform) {
  TORCH_CHECK_VALUE(rule >= 0 && rule < fastfa::kNumRules, "fastfa: rule must be a rule id in [0, ",
                    fastfa::kNumRules, "); got ", rule);
  TORCH_CHECK_VALUE(rows >= 0 && weight_numel >= 0, "fastfa: rows and weight_numel must be non-negative; got ", rows,
                    " and ", weight_numel);
  return {static_cast<fastfa::Rule>(rule), rows, weight_numel, dtype, nchw, stored_feedback, uniform};
}

pybind11::dict auto_plan(int64_t rule, int64_t rows, int64_t weight_numel, at::ScalarType dtype, bool nchw,
                         bool stored_feedback, bool uniform, const std::optional<pybind11::dict>& fields) {
  const fastfa::GradInputPlan plan =
      fastfa::plan_grad_input(grad_input_case(rule, rows, weight_numel, dtype, nchw, stored_feedback, uniform),
                              fields ? costs_from_fields(*fields) : fastfa::auto_costs());
  pybind11::dict result;
  result["vendor"] = plan.vendor;
  result["cuda"] = plan.cuda;
  result["cuda_draw_in_gemm"] = plan.cuda_draw_in_gemm;
  result["cuda_draw_once"] = plan.cuda_draw_once;
  result["triton"] = plan.triton;
  result["triton_draw_in_gemm"] = plan.triton_draw_in_gemm;
  result["triton_draw_once"] = plan.triton_draw_once;
  result["cuda_draws_once"] = plan.cuda_draws_once;
  result["triton_draws_once"] = plan.triton_draws_once;
  result["draws"] = plan.draws;
  return result;
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
  // The cost model (csrc/dispatch.cpp): its constants and its plan, for fastfa._backend.auto_plan.
  m.def("_auto_costs", &auto_costs_fields, pybind11::arg("defaults") = false,
        "The cost model's constants by name: those in use, or the built-in defaults");
  m.def("_set_auto_costs", &set_auto_costs_fields, pybind11::arg("fields"),
        "Replace the cost model's constants (every name of _auto_costs(), floats)");
  m.def("_auto_plan", &auto_plan, pybind11::arg("rule"), pybind11::arg("rows"), pybind11::arg("weight_numel"),
        pybind11::arg("dtype"), pybind11::arg("nchw") = false, pybind11::arg("stored_feedback") = false,
        pybind11::arg("uniform") = true, pybind11::arg("fields") = pybind11::none(),
        "grad_input's modelled paths in seconds (inf: no such path) and the cuda and Triton kernels' draws, on the "
        "constants in use or on `fields`");
  m.def(
      "_fused_grad_input_pays",
      [](int64_t rule, int64_t rows, int64_t weight_numel, at::ScalarType dtype, bool nchw, bool stored_feedback,
         bool uniform) {
        return fastfa::fused_grad_input_pays(
            grad_input_case(rule, rows, weight_numel, dtype, nchw, stored_feedback, uniform));
      },
      pybind11::arg("rule"), pybind11::arg("rows"), pybind11::arg("weight_numel"), pybind11::arg("dtype"),
      pybind11::arg("nchw") = false, pybind11::arg("stored_feedback") = false, pybind11::arg("uniform") = true,
      "What the cuda ops ask: whether grad_input takes the fused kernel");
  m.def(
      "_draws_feedback_once",
      [](int64_t rule, int64_t rows, int64_t weight_numel, at::ScalarType dtype, bool nchw, bool uniform) {
        return fastfa::draws_feedback_once(grad_input_case(rule, rows, weight_numel, dtype, nchw, false, uniform));
      },
      pybind11::arg("rule"), pybind11::arg("rows"), pybind11::arg("weight_numel"), pybind11::arg("dtype"),
      pybind11::arg("nchw") = false, pybind11::arg("uniform") = true,
      "What the cuda ops ask: whether the fused grad_input's drawn B is drawn once by the transform kernel");
  m.def(
      "_triton_draw_once_rows",
      [](int64_t rule, int64_t weight_numel, at::ScalarType dtype) {
        return fastfa::triton_draw_once_rows(grad_input_case(rule, 0, weight_numel, dtype, false, false, true));
      },
      pybind11::arg("rule"), pybind11::arg("weight_numel"), pybind11::arg("dtype"),
      "What the Triton grad_input asks: from how many rows on its drawn B is drawn once by its transform kernel");
  fastfa::bind_layer_call(m);
  fastfa::bind_direct_feedback(m);
}
