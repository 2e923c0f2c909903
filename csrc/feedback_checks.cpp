#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fastfa {

void check_feedback_arguments(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                              const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                              int64_t distribution) {
  TORCH_CHECK(rule >= 0 && rule < kNumRules, "fastfa: rule must be an id in [0, ", kNumRules,
              ") (see fastfa.rules), got ", rule);
  TORCH_CHECK(distribution == static_cast<int64_t>(Distribution::kUniform) ||
                  distribution == static_cast<int64_t>(Distribution::kNormal),
              "fastfa: distribution must be 0 (uniform) or 1 (normal), got ", distribution);
  TORCH_CHECK(std::isfinite(scale), "fastfa: scale must be finite, got ", scale);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "fastfa: weight must be a floating-point tensor, got ", weight.scalar_type());
  const auto kind = static_cast<Rule>(rule);
  const bool needs_stored = kind == Rule::kFixedRandomSignFeedback || estimates_feedback(kind);
  const bool takes_stored = needs_stored || kind == Rule::kFeedbackAlignment;
  const bool has_feedback = feedback.has_value() && feedback->defined();
  if (needs_stored) {
    TORCH_CHECK(has_feedback, "fastfa: rule ", rule, " needs the stored feedback tensor (R for frsf, B for the ",
                "estimated rules)");
  }
  if (has_feedback && takes_stored) {
    TORCH_CHECK(feedback->sizes() == weight.sizes(), "fastfa: feedback must have weight's shape ",
                weight.sizes(), ", got ", feedback->sizes());
    TORCH_CHECK(feedback->scalar_type() == weight.scalar_type(),
                "fastfa: feedback must have weight's dtype ", weight.scalar_type(), ", got ",
                feedback->scalar_type());
    TORCH_CHECK(feedback->device() == weight.device(), "fastfa: feedback must be on weight's device ",
                weight.device(), ", got ", feedback->device());
  }
  const bool draws = kind == Rule::kBatchRandomSignFeedback || kind == Rule::kWeightMirror ||
                     (kind == Rule::kFeedbackAlignment && !has_feedback);
  if (draws) {
    TORCH_CHECK(rng.has_value() && rng->defined(),
                "fastfa: this rule draws its feedback and needs rng = int64 tensor [seed, step]");
    TORCH_CHECK(rng->scalar_type() == at::kLong && rng->dim() == 1 && rng->numel() == 2,
                "fastfa: rng must be an int64 tensor of shape [2] holding [seed, step], got ",
                rng->scalar_type(), " of shape ", rng->sizes());
    TORCH_CHECK(rng->device() == weight.device(), "fastfa: rng must be on weight's device ",
                weight.device(), ", got ", rng->device());
  }
}

} // namespace fastfa
