#include "fastfa/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <string_view>

namespace fastfa {
namespace {

// Read by every cuda op, written at import and by a calibration: a pointer swapped atomically
// to a copy that is never freed (a process sets the constants a handful of times).
std::atomic<const AutoCosts*>& costs_slot() {
  static std::atomic<const AutoCosts*> slot{new AutoCosts()};
  return slot;
}

std::atomic<bool>& fused_flag() {
  static std::atomic<bool> flag{[] {
    const char* value = std::getenv("FASTFA_CUDA_FUSED");
    return value != nullptr && std::string_view(value) != "" && std::string_view(value) != "0";
  }()};
  return flag;
}

} // namespace

void set_auto_costs(const AutoCosts& costs) { costs_slot().store(new AutoCosts(costs)); }

AutoCosts auto_costs() { return *costs_slot().load(std::memory_order_relaxed); }

bool cuda_fused_passes() { return fused_flag().load(std::memory_order_relaxed); }

void set_cuda_fused_passes(bool fused) { fused_flag().store(fused); }

bool fused_grad_input_pays(Rule transform, int64_t rows, int64_t weight_numel, c10::ScalarType dtype, bool nchw) {
  const AutoCosts& costs = *costs_slot().load(std::memory_order_relaxed);
  double fraction = 0.0;
  int reads = 1;  // bytes of W read by the transform kernel, per element of B it writes
  switch (transform) {
  case Rule::kUniformSignSymmetry:
    fraction = costs.fraction_usf;
    break;
  case Rule::kBatchRandomSignFeedback:
    fraction = costs.fraction_brsf;
    break;
  case Rule::kFixedRandomSignFeedback:
    fraction = costs.fraction_frsf;
    reads = 2;  // W and R
    break;
  case Rule::kFeedbackAlignment:
    fraction = costs.fraction_fa;
    reads = 0;  // drawn from (seed, step, index): nothing read
    break;
  default:
    return false;  // B as it is: the fused kernel would be a plain GEMM, slower than the vendor's
  }
  double peak = 0.0;
  switch (dtype) {
  case c10::ScalarType::BFloat16:
    peak = costs.peak_tflops_bf16;
    break;
  case c10::ScalarType::Half:
    peak = costs.peak_tflops_fp16;
    break;
  case c10::ScalarType::Float:
    peak = costs.peak_tflops_fp32;
    break;
  default:
    return false;  // fp64: no fused kernel
  }
  if (nchw) {
    fraction *= costs.nchw_factor;
  }
  if (!(fraction > 0.0) || !(peak > 0.0)) {
    return false;
  }
  const double vendor = 2.0 * static_cast<double>(rows) * static_cast<double>(weight_numel) / (peak * 1e12);
  const double element = static_cast<double>(c10::elementSize(dtype));
  const double transform_pass = costs.launch_us * 1e-6 + (reads + 1) * static_cast<double>(weight_numel) * element /
                                                             (costs.bandwidth_tbs * 1e12);
  // Ties go to the vendor GEMM, as in auto_plan.
  return vendor / fraction < vendor + transform_pass;
}

} // namespace fastfa
