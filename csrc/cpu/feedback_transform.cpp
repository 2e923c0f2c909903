// The feedback transform on the CPU: B = T(W) in one parallel pass over W.
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace fastfa {
namespace {

// One loop per rule, with the rule a compile-time constant: feedback_transform's switch
// folds away and the loop body is straight-line code the compiler can vectorise.
template <Rule kRule, typename scalar_t>
void transform_range(const scalar_t* weight, const scalar_t* stored, scalar_t* out, int64_t begin, int64_t end,
                     at::opmath_type<scalar_t> scale, Distribution distribution, uint64_t seed, uint64_t step,
                     DrawIndex draw_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kDraws = kRule == Rule::kBatchRandomSignFeedback || kRule == Rule::kFeedbackAlignment;
  for (int64_t i = begin; i < end; ++i) {
    opmath_t xi = opmath_t(0), r = opmath_t(0);
    if constexpr (kDraws) {
      if (stored == nullptr) {
        xi = static_cast<opmath_t>(unit_draw(seed, step, draw_index(i), distribution));
        r = scale * xi; // fa regenerating R from (seed, step, index)
      }
    }
    if (stored != nullptr) {
      r = static_cast<opmath_t>(stored[i]);
    }
    out[i] = static_cast<scalar_t>(
        feedback_transform<opmath_t>(kRule, static_cast<opmath_t>(weight[i]), r, xi, scale));
  }
}

template <typename scalar_t>
void transform_kernel(const scalar_t* weight, const scalar_t* stored, scalar_t* out, int64_t numel, Rule rule,
                      double scale, Distribution distribution, uint64_t seed, uint64_t step, DrawIndex draw_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto s = static_cast<opmath_t>(scale);
  // About 32 KiB of W per task: large enough to amortise the thread hand-off.
  constexpr int64_t kGrain = 8192;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    switch (rule) {
    case Rule::kBackprop:
      return transform_range<Rule::kBackprop>(weight, stored, out, begin, end, s, distribution, seed, step, draw_index);
    case Rule::kFeedbackAlignment:
      return transform_range<Rule::kFeedbackAlignment>(weight, stored, out, begin, end, s, distribution, seed, step,
                                                       draw_index);
    case Rule::kUniformSignSymmetry:
      return transform_range<Rule::kUniformSignSymmetry>(weight, stored, out, begin, end, s, distribution, seed,
                                                         step, draw_index);
    case Rule::kBatchRandomSignFeedback:
      return transform_range<Rule::kBatchRandomSignFeedback>(weight, stored, out, begin, end, s, distribution, seed,
                                                             step, draw_index);
    case Rule::kFixedRandomSignFeedback:
      return transform_range<Rule::kFixedRandomSignFeedback>(weight, stored, out, begin, end, s, distribution, seed,
                                                             step, draw_index);
    }
  });
}

} // namespace

at::Tensor feedback_transform_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                  const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                  int64_t distribution) {
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(weight.device().is_cpu(), "fastfa: feedback_transform_cpu needs a CPU weight, got ",
              weight.device());
  const auto kind = static_cast<Rule>(rule);
  const bool has_feedback = feedback.has_value() && feedback->defined();
  const bool uses_stored = has_feedback && (kind == Rule::kFeedbackAlignment ||
                                            kind == Rule::kFixedRandomSignFeedback);
  // The kernel walks W, R and B with one flat index, so all three share W's layout
  // (channels_last included) and B comes back in that layout.
  const auto memory_format = weight.suggest_memory_format();
  const at::Tensor w = weight.contiguous(memory_format);
  const at::Tensor r = uses_stored ? feedback->contiguous(memory_format) : at::Tensor();
  at::Tensor out = at::empty_like(w, w.options(), memory_format);
  DrawIndex draw_index;
  if (memory_format == at::MemoryFormat::ChannelsLast) {
    draw_index = {true, static_cast<uint64_t>(w.size(1)), static_cast<uint64_t>(w.size(2)),
                  static_cast<uint64_t>(w.size(3))};
  }
  uint64_t seed = 0, step = 0;
  if (rng.has_value() && rng->defined()) {
    const at::Tensor state = rng->contiguous();
    seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
    step = static_cast<uint64_t>(state.data_ptr<int64_t>()[1]);
  }
  if (w.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "feedback_transform_cpu", [&] {
    transform_kernel<scalar_t>(w.const_data_ptr<scalar_t>(),
                               uses_stored ? r.const_data_ptr<scalar_t>() : nullptr,
                               out.mutable_data_ptr<scalar_t>(), w.numel(), kind, scale,
                               static_cast<Distribution>(distribution), seed, step, draw_index);
  });
  return out;
}

} // namespace fastfa
