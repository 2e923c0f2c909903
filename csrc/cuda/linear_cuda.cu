// The cuda backend's linear ops: each pass on the vendor GEMM where nothing is fused, on
// fastfa's fused tensor-core GEMMs (gemm_kernel.cuh) where they pay (issue 18).
//
//   forward      y = act(x W^T + b)    cuBLASLt through ATen: relu and bias in the GEMM's epilogue
//                                      (at::_addmm_activation); other activations as the aten
//                                      backend runs them (at::linear's bias epilogue, then one
//                                      elementwise pass: they need z saved for the backward)
//   grad_input   delta T(W)            the fused GEMM with the rule's transform on W's tiles (split
//                                      over K in fp32 slices for few rows), or
//                                      the transform kernel + cuBLAS, by the cost model of
//                                      fastfa/dispatch.h (B used as it is: always cuBLAS)
//   grad_weight  delta^T x, grad_bias  cuBLAS and one row sum, as the aten backend; with it B's
//                                      gradient of the estimated rules
// FASTFA_CUDA_FUSED=1 (or fastfa.set_cuda_fused(True)) runs every pass on the fused GEMMs instead,
// so that a GPU run can time both: the forward with bias and activation in its epilogue,
// grad_weight with grad_bias from its A loader's row sums (split over K in fp32 slices for a long
// batch), kp's and sa's B gradient from tensors the op has, wm / aa / ia's on aten.
// delta = dL/dz is materialised by ATen when there is an activation (one elementwise pass,
// shared by both backward GEMMs). The kernels draw brsf's / fa's R uniformly, as linear
// layers do; a normal draw (only reachable through the op itself), and a draw the cost model
// (fastfa/dispatch.h) makes once rather than in every CTA along M (a few row tiles and more),
// makes B with the transform kernel first. What the fused kernels do not cover takes the aten
// path (cuBLAS): fp64, fp32 while torch.backends.cuda.matmul.allow_tf32 is off, GPUs below
// sm_80. On the fused passes that is warned and recorded (fastfa.last_fallbacks()), as is every
// B gradient of wm, aa, ia; by default it is simply the vendor path.
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

// K tiles per slice of grad_input (rows x in_features over K = out_features): split only where
// its tiles are fewer than the SMs (few rows), into the slices that fill the SMs once, each at
// least four K tiles. Each slice costs an fp32 pass over C, repaid only while SMs would idle.
int64_t grad_input_k_tiles_per_split(const at::Tensor& like, int64_t rows, int64_t in_features,
                                     int64_t out_features) {
  const int64_t tiles = k_tiles(like, out_features);
  const int64_t ctas = ((rows + 127) / 128) * ((in_features + 127) / 128);
  const int64_t sms = at::cuda::getDeviceProperties(like.get_device())->multiProcessorCount;
  if (ctas >= sms) {
    return tiles;
  }
  const int64_t splits = std::max<int64_t>(1, std::min((sms + ctas - 1) / ctas, tiles / 4));
  return std::max<int64_t>(1, (tiles + splits - 1) / splits);
}

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

// grad_x = delta B, B = T(W) made tile by tile inside the GEMM; delta is rows x out_features.
at::Tensor fused_grad_input(const at::Tensor& delta, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
                            Rule rule, double scale, int64_t distribution) {
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t rows = delta.size(0);
  const FeedbackOperand b(rule, weight, feedback, rng, scale, distribution, at::MemoryFormat::Contiguous, rows);
  gemm::Problem problem;
  problem.m = rows;
  problem.n = in_features;
  problem.k = out_features;
  problem.a = {delta.const_data_ptr(), out_features, 1};
  problem.b = {b.operand.const_data_ptr(), 1, in_features};  // B[n][k] = W[k][n]: offsets are W's indices
  problem.ldc = in_features;
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t per_split = grad_input_k_tiles_per_split(input, rows, in_features, out_features);
  const int64_t splits = (k_tiles(input, out_features) + per_split - 1) / per_split;
  at::Tensor grad_input;
  if (splits > 1) {
    // Few rows over a long K: K slices in fp32, added here.
    at::Tensor partial = at::empty({splits, rows, in_features}, input.options().dtype(at::kFloat));
    check_launch(with_element(input.scalar_type(),
                              [&](auto element) {
                                return gemm::split_feedback_gemm<decltype(element)>(
                                    arch, b.transform, problem, b.args, partial.mutable_data_ptr<float>(), per_split,
                                    stream);
                              }),
                 "grad_input");
    grad_input = partial.sum(0).to(input.scalar_type());
  } else {
    grad_input = at::empty({rows, in_features}, input.options());
    problem.c = grad_input.mutable_data_ptr();
    check_launch(with_element(input.scalar_type(),
                              [&](auto element) {
                                return gemm::feedback_gemm<decltype(element)>(arch, b.transform, problem, b.args,
                                                                              stream);
                              }),
                 "grad_input");
  }
  return grad_input.view(input.sizes());
}

// The forward on the vendor GEMM. relu with a bias is cuBLASLt's RELU_BIAS epilogue, one kernel;
// the other cases are the aten backend's own forward (aa / ia keep r = x W^T without bias; gelu
// and silu need z kept for the backward, which no epilogue that ATen reaches writes).
std::tuple<at::Tensor, at::Tensor, at::Tensor> vendor_linear_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
  if (activation == "relu" && has_tensor(bias) && !saves_projection(rule) && input.numel() > 0 &&
      weight.numel() > 0) {
    const int64_t out_features = weight.size(0), in_features = weight.size(1);
    const at::Tensor output = at::_addmm_activation(*bias, input.reshape({batch_rows(input, in_features), in_features}),
                                                    weight.t(), 1, 1, /*use_gelu=*/false);
    return {output.view(output_shape(input, out_features)), output.new_empty({0}), output.new_empty({0})};
  }
  return linear_forward(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
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
  if (!cuda_fused_passes()) {
    const c10::cuda::CUDAGuard device_guard(input.device());
    return vendor_linear_forward(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
  }
  if (const char* reason = aten_path_reason(input)) {
    TORCH_WARN_ONCE("fastfa: the cuda backend runs linear in ", reason, " on the aten path (cuBLAS)");
    record_fallback("cuda_linear", reason);
    return linear_forward(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t rows = batch_rows(input, in_features);
  const at::Tensor x = input.reshape({rows, in_features}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor output = at::empty({rows, out_features}, input.options());
  const ForwardOutputs outputs = forward_outputs(output, b, kind, rule);

  gemm::Problem problem;
  problem.m = rows;
  problem.n = out_features;
  problem.k = in_features;
  problem.a = {x.const_data_ptr(), in_features, 1};
  problem.b = {w.const_data_ptr(), in_features, 1};
  problem.c = output.mutable_data_ptr();
  problem.ldc = out_features;
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(with_element(input.scalar_type(),
                            [&](auto element) {
                              return gemm::linear_forward_gemm<decltype(element)>(arch, problem, outputs.epilogue,
                                                                                  stream);
                            }),
               "linear forward");
  const auto shape = output_shape(input, out_features);
  const auto in_shape = [&](const at::Tensor& t) { return t.numel() > 0 ? t.view(shape) : t; };
  return {output.view(shape), in_shape(outputs.saved), in_shape(outputs.projection)};
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
  const auto kind = static_cast<Rule>(rule);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (!cuda_fused_passes()) {
    // The vendor passes (aten's backward, on delta), grad_input on the fused kernel where the model
    // says it pays and the kernel can run it (not an empty batch, nothing aten_path_reason names:
    // cuBLAS there is the chosen path, not a fallback, so nothing is recorded).
    const bool fused_input = output_mask[0] && rows > 0 && aten_path_reason(input) == nullptr &&
                             grad_input_on_fused_kernel(kind, feedback, distribution, rows, weight, false);
    const at::Tensor delta = activation_delta(grad_output, activation_saved, activation);
    auto gradients = linear_backward(delta, input, weight, feedback, rng, delta.new_empty({0}), projection, rule, scale,
                                     distribution, alignment, "none",
                                     {output_mask[0] && !fused_input, output_mask[1], output_mask[2], output_mask[3]});
    if (fused_input) {
      std::get<0>(gradients) = fused_grad_input(delta.reshape({rows, out_features}).contiguous(), input, weight,
                                                feedback, rng, kind, scale, distribution);
    }
    return gradients;
  }
  if (const char* reason = aten_path_reason(input)) {
    TORCH_WARN_ONCE("fastfa: the cuda backend runs linear's backward in ", reason, " on the aten path (cuBLAS)");
    record_fallback("cuda_linear_backward", reason);
    return linear_backward(grad_output, input, weight, feedback, rng, activation_saved, projection, rule, scale,
                           distribution, alignment, activation, output_mask);
  }
  const bool feedback_grad = output_mask[3] && estimates_feedback(kind);
  const at::Tensor delta =
      activation_delta(grad_output, activation_saved, activation).reshape({rows, out_features}).contiguous();
  const at::Tensor x = input.reshape({rows, in_features}).contiguous();
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_input, grad_weight, grad_bias, grad_feedback;
  if (output_mask[0]) {
    grad_input = fused_grad_input(delta, input, weight, feedback, rng, kind, scale, distribution);
  }
  const bool needs_grad_weight = output_mask[1] || (feedback_grad && kind == Rule::kKolenPollack);
  if (needs_grad_weight) {
    // grad_bias rides along as the row sums of A = delta^T; with no columns there is no CTA.
    const bool fused_bias = output_mask[2] && in_features > 0;
    gemm::Problem problem;
    problem.m = out_features;
    problem.n = in_features;
    problem.k = rows;
    problem.a = {delta.const_data_ptr(), 1, out_features};
    problem.b = {x.const_data_ptr(), 1, in_features};
    problem.ldc = in_features;
    const int64_t per_split = k_tiles_per_split(input, out_features, in_features, rows);
    const int64_t splits = (k_tiles(input, rows) + per_split - 1) / per_split;
    if (splits > 1) {
      // A long batch over few output tiles: K slices in fp32, added here.
      const auto fp32 = input.options().dtype(at::kFloat);
      at::Tensor partial = at::empty({splits, out_features, in_features}, fp32);
      at::Tensor partial_sums = at::empty({splits, out_features}, fp32);
      check_launch(with_element(input.scalar_type(),
                                [&](auto element) {
                                  return gemm::split_gemm<decltype(element)>(
                                      arch, problem, partial.mutable_data_ptr<float>(),
                                      partial_sums.mutable_data_ptr<float>(), per_split, stream);
                                }),
                   "grad_weight");
      grad_weight = partial.sum(0).to(weight.scalar_type());
      if (fused_bias) {
        grad_bias = partial_sums.sum(0).to(weight.scalar_type());
      }
    } else {
      grad_weight = at::empty({out_features, in_features}, weight.options());
      if (fused_bias) {
        grad_bias = at::empty({out_features}, weight.options());
      }
      problem.c = grad_weight.mutable_data_ptr();
      problem.a_row_sums = fused_bias ? grad_bias.mutable_data_ptr() : nullptr;
      check_launch(with_element(input.scalar_type(),
                                [&](auto element) {
                                  return gemm::feedback_gemm<decltype(element)>(arch, Rule::kBackprop, problem, {},
                                                                                stream);
                                }),
                   "grad_weight");
    }
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
      record_fallback("cuda_linear_backward", kFeedbackGradientOnAten);
      grad_feedback = std::get<3>(linear_backward(grad_output, input, weight, feedback, rng, activation_saved,
                                                  projection, rule, scale, distribution, alignment, activation,
                                                  {false, false, false, true}));
    }
  }
  return {output_mask[0] ? grad_input : input.new_empty({0}), output_mask[1] ? grad_weight : weight.new_empty({0}),
          output_mask[2] ? grad_bias : weight.new_empty({0}), feedback_grad ? grad_feedback : weight.new_empty({0})};
}

} // namespace fastfa
