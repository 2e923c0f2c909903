// The cuda backend's linear ops: fastfa's fused tensor-core GEMMs (gemm_kernel.cuh).
//
//   forward      y = act(x W^T + b)         one GEMM, bias and activation in its epilogue
//   grad_input   delta T(W)                 one GEMM, the rule's transform on W's tiles
//   grad_weight  delta^T x, grad_bias       one GEMM, grad_bias from its A loader's row sums
// delta = dL/dz is materialised by ATen when there is an activation (one elementwise pass,
// shared by both backward GEMMs). The kernels draw brsf's / fa's R uniformly, as linear
// layers do; a normal draw (only reachable through the op itself) makes B with the
// transform kernel first. The estimated rules' B gradient: kp and sa are sums of
// tensors this op already has; wm, aa and ia run the aten backend's computation.
// What the fused kernels do not cover takes the aten path (cuBLAS), with a warning that
// says why: fp64, fp32 while torch.backends.cuda.matmul.allow_tf32 is off, GPUs below sm_80.
#include "fused_ops.h"

#include "fastfa/ops.h"

#include <c10/cuda/CUDAGuard.h>

namespace fastfa {
namespace {

using namespace fused;

int64_t batch_rows(const at::Tensor& input, int64_t in_features) {
  return in_features > 0 ? input.numel() / in_features
                         : c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
}

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_linear_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
  check_linear_arguments(input, weight, bias);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(alignment.size() == 4, "fastfa: alignment must be [alpha, beta, gamma, sigma], got ",
              alignment.size(), " values");
  const gemm::Activation kind = device_activation(activation);
  if (const char* reason = aten_path_reason(input)) {
    TORCH_WARN_ONCE("fastfa: the cuda backend runs linear in ", reason, " on the aten path (cuBLAS)");
    return linear_forward(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t rows = batch_rows(input, in_features);
  const at::Tensor x = input.reshape({rows, in_features}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor output = at::empty({rows, out_features}, input.options());
  const bool keeps_z = derivative_needs_preactivation(kind), keeps_r = saves_projection(rule);
  at::Tensor saved = keeps_z ? at::empty_like(output) : input.new_empty({0});
  at::Tensor projection = keeps_r ? at::empty_like(output) : input.new_empty({0});

  gemm::Problem problem;
  problem.m = rows;
  problem.n = out_features;
  problem.k = in_features;
  problem.a = {x.const_data_ptr(), in_features, 1};
  problem.b = {w.const_data_ptr(), in_features, 1};
  problem.c = output.mutable_data_ptr();
  problem.ldc = out_features;
  gemm::LinearEpilogueArgs epilogue;
  epilogue.bias = data_or_null(b);
  epilogue.saved = keeps_z ? saved.mutable_data_ptr() : nullptr;
  epilogue.projection = keeps_r ? projection.mutable_data_ptr() : nullptr;
  epilogue.activation = kind;
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(with_element(input.scalar_type(),
                            [&](auto element) {
                              return gemm::linear_forward_gemm<decltype(element)>(arch, problem, epilogue, stream);
                            }),
               "linear forward");
  const auto shape = output_shape(input, out_features);
  return {output.view(shape), keeps_z ? saved.view(shape) : saved, keeps_r ? projection.view(shape) : projection};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_linear_arguments(input, weight, std::nullopt);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(alignment.size() == 4, "fastfa: alignment must be [alpha, beta, gamma, sigma], got ",
              alignment.size(), " values");
  device_activation(activation);  // refuses an unknown name before any kernel runs
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t rows = batch_rows(input, in_features);
  TORCH_CHECK(grad_output.numel() == rows * out_features, "fastfa: grad_output must have ", rows * out_features,
              " elements (", rows, " rows of ", out_features, "), got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              "fastfa: grad_output must have input's dtype and device (", input.scalar_type(), ", ", input.device(),
              "), got ", grad_output.scalar_type(), ", ", grad_output.device());
  if (const char* reason = aten_path_reason(input)) {
    TORCH_WARN_ONCE("fastfa: the cuda backend runs linear's backward in ", reason, " on the aten path (cuBLAS)");
    return linear_backward(grad_output, input, weight, feedback, rng, activation_saved, projection, rule, scale,
                           distribution, alignment, activation, output_mask);
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto kind = static_cast<Rule>(rule);
  const bool feedback_grad = output_mask[3] && estimates_feedback(kind);
  const at::Tensor delta =
      activation_delta(grad_output, activation_saved, activation).reshape({rows, out_features}).contiguous();
  const at::Tensor x = input.reshape({rows, in_features}).contiguous();
  const at::Tensor w = weight.contiguous();
  const bool has_feedback = feedback.has_value() && feedback->defined();
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_input, grad_weight, grad_bias, grad_feedback;
  if (output_mask[0]) {
    // grad_x = delta B, B = T(W) made tile by tile inside the GEMM. Where B is a stored
    // tensor (fa's R, the estimated rules' B) it is the operand itself, untransformed.
    Rule transform = kind;
    at::Tensor operand = w, stored;
    if (estimates_feedback(kind) || (kind == Rule::kFeedbackAlignment && has_feedback)) {
      operand = feedback->contiguous();
      transform = Rule::kBackprop;
    } else if (kind == Rule::kFixedRandomSignFeedback) {
      stored = feedback->contiguous();
    } else if ((kind == Rule::kBatchRandomSignFeedback || kind == Rule::kFeedbackAlignment) &&
               static_cast<Distribution>(distribution) == Distribution::kNormal) {
      // The kernels draw uniformly (what linear layers use); a normal draw's B comes from
      // the transform kernel, as on the aten path, and the GEMM takes it as it is.
      operand = feedback_transform_cuda(w, feedback, rng, rule, scale, distribution);
      transform = Rule::kBackprop;
    }
    TORCH_CHECK(gemm::has_feedback_kernel(transform), "fastfa: no fused grad_input kernel for rule ", rule);
    const at::Tensor state = rng.has_value() && rng->defined() ? rng->contiguous() : at::Tensor();
    grad_input = at::empty({rows, in_features}, input.options());
    gemm::Problem problem;
    problem.m = rows;
    problem.n = in_features;
    problem.k = out_features;
    problem.a = {delta.const_data_ptr(), out_features, 1};
    problem.b = {operand.const_data_ptr(), 1, in_features};  // B[n][k] = W[k][n]: offsets are W's indices
    problem.c = grad_input.mutable_data_ptr();
    problem.ldc = in_features;
    gemm::FeedbackArgs args;
    args.stored = data_or_null(stored);
    args.rng = state.defined() ? state.const_data_ptr<int64_t>() : nullptr;
    args.scale = static_cast<float>(scale);
    check_launch(with_element(input.scalar_type(),
                              [&](auto element) {
                                return gemm::feedback_gemm<decltype(element)>(arch, transform, problem, args, stream);
                              }),
                 "grad_input");
    grad_input = grad_input.view(input.sizes());
  }
  const bool needs_grad_weight = output_mask[1] || (feedback_grad && kind == Rule::kKolenPollack);
  if (needs_grad_weight) {
    grad_weight = at::empty({out_features, in_features}, weight.options());
    // grad_bias rides along as the row sums of A = delta^T; with no columns there is no CTA.
    const bool fused_bias = output_mask[2] && in_features > 0;
    if (fused_bias) {
      grad_bias = at::empty({out_features}, weight.options());
    }
    gemm::Problem problem;
    problem.m = out_features;
    problem.n = in_features;
    problem.k = rows;
    problem.a = {delta.const_data_ptr(), 1, out_features};
    problem.b = {x.const_data_ptr(), 1, in_features};
    problem.c = grad_weight.mutable_data_ptr();
    problem.ldc = in_features;
    problem.a_row_sums = fused_bias ? grad_bias.mutable_data_ptr() : nullptr;
    check_launch(with_element(input.scalar_type(),
                              [&](auto element) {
                                return gemm::feedback_gemm<decltype(element)>(arch, Rule::kBackprop, problem, {},
                                                                              stream);
                              }),
                 "grad_weight");
  }
  if (output_mask[2] && !grad_bias.defined()) {
    grad_bias = delta.sum(0);
  }
  if (feedback_grad) {
    const double alpha = alignment[0], beta = alignment[1];
    if (kind == Rule::kKolenPollack) {  // grad_W + alpha * decay
      grad_feedback = (grad_weight + *feedback * (2.0 * alpha)).contiguous();
    } else if (kind == Rule::kSymmetricAlignment) {  // alpha * decay + beta * self
      grad_feedback = (*feedback * (2.0 * alpha) - weight * beta).contiguous();
    } else {
      // wm, aa, ia: the aten backend's alignment GEMMs (cuBLAS), not fused here.
      grad_feedback = std::get<3>(linear_backward(grad_output, input, weight, feedback, rng, activation_saved,
                                                  projection, rule, scale, distribution, alignment, activation,
                                                  {false, false, false, true}));
    }
  }
  return {output_mask[0] ? grad_input : input.new_empty({0}), output_mask[1] ? grad_weight : weight.new_empty({0}),
          output_mask[2] ? grad_bias : weight.new_empty({0}), feedback_grad ? grad_feedback : weight.new_empty({0})};
}

} // namespace fastfa
