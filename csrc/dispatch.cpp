#include "fastfa/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <limits>
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

constexpr double kNever = std::numeric_limits<double>::infinity();

double peak_flops(const AutoCosts& costs, c10::ScalarType dtype) {
  switch (dtype) {
  case c10::ScalarType::BFloat16:
    return costs.peak_tflops_bf16 * 1e12;
  case c10::ScalarType::Half:
    return costs.peak_tflops_fp16 * 1e12;
  case c10::ScalarType::Float:
    return costs.peak_tflops_fp32 * 1e12;
  default:
    return 0.0;  // fp64: no tensor-core GEMM modelled, and no fused kernel
  }
}

// The fused grad_input's time from its fraction of the vendor GEMM's speed; never without one.
double fused_time(double vendor_gemm, double fraction) { return fraction > 0.0 ? vendor_gemm / fraction : kNever; }

} // namespace

void set_auto_costs(const AutoCosts& costs) { costs_slot().store(new AutoCosts(costs)); }

AutoCosts auto_costs() { return *costs_slot().load(std::memory_order_relaxed); }

bool cuda_fused_passes() { return fused_flag().load(std::memory_order_relaxed); }

void set_cuda_fused_passes(bool fused) { fused_flag().store(fused); }

GradInputPlan plan_grad_input(const GradInputCase& problem, const AutoCosts& costs) {
  GradInputPlan plan;
  plan.cuda = plan.cuda_draw_in_gemm = plan.cuda_draw_once = kNever;
  plan.triton = plan.triton_draw_in_gemm = plan.triton_draw_once = kNever;
  const double peak = peak_flops(costs, problem.dtype);
  const double numel = static_cast<double>(problem.weight_numel);
  const double vendor_gemm = peak > 0.0 ? 2.0 * static_cast<double>(problem.rows) * numel / peak : kNever;
  plan.vendor = vendor_gemm;
  const Rule rule = problem.rule;
  const bool transformed = rule == Rule::kUniformSignSymmetry || rule == Rule::kBatchRandomSignFeedback ||
                           rule == Rule::kFixedRandomSignFeedback ||
                           (rule == Rule::kFeedbackAlignment && !problem.stored_feedback);
  if (!transformed || !(peak > 0.0)) {
    return plan;  // B as it is: the fused kernel would be a plain GEMM, slower than the vendor's
  }
  // Bytes of W read by the transform kernel per element of B it writes: R beside W for frsf,
  // nothing for fa (drawn from (seed, step, index)).
  const int reads = rule == Rule::kFixedRandomSignFeedback ? 2 : (rule == Rule::kFeedbackAlignment ? 0 : 1);
  const double element = static_cast<double>(c10::elementSize(problem.dtype));
  const double transform = costs.launch_us * 1e-6 + (reads + 1) * numel * element / (costs.bandwidth_tbs * 1e12);
  plan.vendor = vendor_gemm + transform;
  const double nchw = problem.nchw ? costs.nchw_factor : 1.0;
  double cuda_fraction = 0.0, triton_fraction = 0.0;
  switch (rule) {
  case Rule::kUniformSignSymmetry:
    cuda_fraction = costs.cuda_usf, triton_fraction = costs.triton_usf;
    break;
  case Rule::kBatchRandomSignFeedback:
    cuda_fraction = costs.cuda_brsf, triton_fraction = costs.triton_brsf;
    break;
  case Rule::kFixedRandomSignFeedback:
    cuda_fraction = costs.cuda_frsf, triton_fraction = costs.triton_frsf;
    break;
  default:
    cuda_fraction = costs.cuda_fa, triton_fraction = costs.triton_fa;
    break;
  }
  plan.draws = rule == Rule::kBatchRandomSignFeedback || rule == Rule::kFeedbackAlignment;
  if (!plan.draws) {
    plan.cuda = fused_time(vendor_gemm, cuda_fraction * nchw);
    plan.triton = fused_time(vendor_gemm, triton_fraction);
    return plan;
  }
  // Triton's kernels draw either distribution in the GEMM, and its conv2d has no NCHW gathers.
  plan.triton_draw_in_gemm = fused_time(vendor_gemm, triton_fraction);
  plan.triton_draw_once = transform + fused_time(vendor_gemm, costs.triton_bp);
  plan.triton_draws_once = plan.triton_draw_once < plan.triton_draw_in_gemm;
  plan.triton = plan.triton_draws_once ? plan.triton_draw_once : plan.triton_draw_in_gemm;
  plan.cuda_draw_in_gemm = problem.uniform ? fused_time(vendor_gemm, cuda_fraction * nchw) : kNever;
  plan.cuda_draw_once = transform + fused_time(vendor_gemm, costs.cuda_bp * nchw);
  plan.cuda_draws_once = !problem.uniform || plan.cuda_draw_once < plan.cuda_draw_in_gemm;
  plan.cuda = plan.cuda_draws_once ? plan.cuda_draw_once : plan.cuda_draw_in_gemm;
  return plan;
}

bool fused_grad_input_pays(const GradInputCase& problem) {
  const GradInputPlan plan = plan_grad_input(problem, *costs_slot().load(std::memory_order_relaxed));
  return plan.cuda < plan.vendor;  // ties go to the vendor GEMM, as in auto_plan
}

bool draws_feedback_once(const GradInputCase& problem) {
  return plan_grad_input(problem, *costs_slot().load(std::memory_order_relaxed)).cuda_draws_once;
}

int64_t triton_draw_once_rows(const GradInputCase& problem) {
  // Drawing in the GEMM costs a fixed multiple of the GEMM, drawing once a fixed transform more: the
  // model's choice flips once as rows grow, so the first row count that draws once is found by
  // bisection on the model itself (about 60 plans, under a µs) rather than by its formula rewritten.
  const AutoCosts costs = *costs_slot().load(std::memory_order_relaxed);
  GradInputCase at = problem;
  const auto draws_once = [&](int64_t rows) {
    at.rows = rows;
    return plan_grad_input(at, costs).triton_draws_once;
  };
  constexpr int64_t kNeverRows = std::numeric_limits<int64_t>::max();
  int64_t high = 1;
  while (!draws_once(high)) {
    if (high > kNeverRows / 4) {
      return kNeverRows;
    }
    high *= 2;
  }
  int64_t low = high / 2; // draws in the GEMM at low (or low is 0 and high is 1)
  if (low == 0) {
    return draws_once(0) ? 0 : 1;
  }
  while (high - low > 1) {
    const int64_t middle = low + (high - low) / 2;
    (draws_once(middle) ? high : low) = middle;
  }
  return high;
}

} // namespace fastfa
