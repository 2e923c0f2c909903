// The cuda backend's conv2d ops: each pass on cuDNN through ATen where nothing is fused, on
// implicit GEMMs of fastfa's fused tensor-core kernel (implicit_gemm.cuh, nothing unfolded in
// memory) where they pay (issue 18).
//
//   forward      y = act(conv(x, W) + b)        cuDNN with its bias (at::convolution), then the
//                                               activation, as the aten backend runs it
//   grad_input   conv_transpose(delta, T(W))    the implicit GEMM with the rule's transform on W
//                                               as it loads, or the transform kernel + cuDNN, by
//                                               the cost model of fastfa/dispatch.h
//   grad_weight  delta^T im2col(x), grad_b      cuDNN (at::convolution_backward), with B's
//                                               gradient of the estimated rules
// FASTFA_CUDA_FUSED=1 (or fastfa.set_cuda_fused(True)) runs every pass on the implicit GEMMs
// instead, so that a GPU run can time both: the forward with bias and activation in its epilogue,
// grad_weight as one split-K GEMM (fp32 slices that ATen adds: K is batch x pixels, far longer
// than M x N) with grad_bias, kp's and sa's B gradient from tensors the op has, wm / aa / ia's by
// the aten backend's convolutions.
// Activations are read through their strides (copied only where an element lies 2^31 or
// more elements from the base) and outputs are made in the input's memory format;
// channels_last runs 16-byte vector loads along channels. delta = dL/dz comes from ATen when
// there is an activation, as in the linear op.
// Not covered by the implicit GEMMs, and run on the aten path (cuDNN after the CUDA transform
// kernel) with a warning that says why (Python shows it once per call site): the linear ops'
// reasons (fp64, fp32 without tf32, GPUs below sm_80), groups > 1, tensors of 2^31 elements or
// more, and grad_input of a strided convolution (as one implicit GEMM it would multiply the
// stride's skipped pixels by zero: stride^2 the work). On the fused passes each is recorded
// (fastfa.last_fallbacks()), as are wm / aa / ia's B gradient and calls with an empty tensor
// (nothing to launch; no warning); by default they are simply the vendor path.
// Only the kernels' declarations (fastfa/gemm.h, through fused_ops.h): their instantiations
// live in gemm_<dtype>_conv*.cu, compiled once.
#include "fused_ops.h"

#include "fastfa/ops.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace fastfa {
namespace {

using namespace fused;

constexpr int64_t kMaxElements = std::numeric_limits<int32_t>::max();  // the indices' 32-bit coordinates
constexpr const char* kEmpty = "with an empty tensor (no implicit GEMM to launch)";

void check_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastfa: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "fastfa: conv2d stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "fastfa: conv2d padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "fastfa: conv2d dilation must be positive, got ", dilation);
}

gemm::ImageStrides strides_of(const at::Tensor& tensor) {
  return {tensor.stride(0), tensor.stride(1), tensor.stride(2), tensor.stride(3)};
}

// The tensor itself where every element lies within 2^31 elements of its base (the kernels'
// 32-bit offsets), else a dense copy in `format` (the op checked numel < 2^31).
at::Tensor within_32bit_offsets(const at::Tensor& tensor, at::MemoryFormat format) {
  int64_t span = 0;
  for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
    span += (tensor.size(axis) - 1) * tensor.stride(axis);
  }
  return span < kMaxElements ? tensor : tensor.contiguous(format);
}

gemm::ConvShape conv_shape(const at::Tensor& input, const at::Tensor& weight, const std::vector<int64_t>& output,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           bool channels_last) {
  gemm::ConvShape shape;
  shape.batch = input.size(0);
  shape.in_channels = input.size(1);
  shape.in_h = input.size(2);
  shape.in_w = input.size(3);
  shape.out_channels = weight.size(0);
  shape.kernel_h = weight.size(2);
  shape.kernel_w = weight.size(3);
  shape.out_h = output[2];
  shape.out_w = output[3];
  shape.stride_h = stride[0];
  shape.stride_w = stride[1];
  shape.pad_h = padding[0];
  shape.pad_w = padding[1];
  shape.dilation_h = dilation[0];
  shape.dilation_w = dilation[1];
  shape.channels_last = channels_last;
  return shape;
}

// Why this convolution cannot run as implicit GEMMs (then it takes the aten path), or nullptr.
const char* conv_aten_path_reason(const at::Tensor& input, const at::Tensor& weight,
                                  const std::vector<int64_t>& output, int64_t groups) {
  if (const char* reason = aten_path_reason(input)) {
    return reason;
  }
  if (groups != 1) {
    return "with groups > 1 (the implicit GEMMs cover groups = 1)";
  }
  const int64_t output_numel = output[0] * output[1] * output[2] * output[3];
  if (input.numel() > kMaxElements || output_numel > kMaxElements || weight.numel() > kMaxElements) {
    return "on tensors of 2^31 elements or more (the implicit GEMMs index in 32 bits)";
  }
  return nullptr;
}

at::MemoryFormat layout_of(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous;
}

constexpr const char* kStridedGradInput =
    "grad_input of a strided conv2d (its implicit GEMM would do stride^2 the work)";

// grad_x = conv_transpose(delta, B), B = T(W) made element by element as W loads.
at::Tensor fused_grad_input(const at::Tensor& delta, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
                            Rule rule, double scale, int64_t distribution, const gemm::ConvShape& shape,
                            at::MemoryFormat format) {
  // The cost model's rows for a conv2d (the output's pixels), as grad_input_on_fused_kernel asks it,
  // so that where the fused kernel is chosen it draws B as the model assumed.
  const FeedbackOperand b(rule, weight, feedback, rng, scale, distribution, format, delta.numel() / weight.size(0));
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(format));
  check_launch(with_element(input.scalar_type(),
                            [&](auto element) {
                              return gemm::conv_grad_input_gemm<decltype(element)>(
                                  device_arch(input), b.transform, shape, delta.const_data_ptr(), strides_of(delta),
                                  b.operand.const_data_ptr(), strides_of(b.operand), b.args,
                                  grad_input.mutable_data_ptr(), strides_of(grad_input),
                                  at::cuda::getCurrentCUDAStream());
                            }),
               "conv2d grad_input");
  return grad_input;
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
  check_conv2d_arguments(input, weight, bias, groups);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(alignment.size() == 4, "fastfa: alignment must be [alpha, beta, gamma, sigma], got ",
              alignment.size(), " values");
  check_geometry(stride, padding, dilation);
  const gemm::Activation kind = device_activation(activation);
  const std::vector<int64_t> output = conv2d_output_shape(input, weight, stride, padding, dilation);
  TORCH_CHECK(output[2] > 0 && output[3] > 0, "fastfa: conv2d output would be empty: input ", input.sizes(),
              ", kernel ", weight.sizes().slice(2), ", stride ", stride, ", padding ", padding, ", dilation ",
              dilation);
  if (!cuda_fused_passes()) {
    const c10::cuda::CUDAGuard device_guard(input.device());
    return conv2d_forward(input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale,
                          distribution, alignment, activation);
  }
  const char* reason = conv_aten_path_reason(input, weight, output, groups);
  if (reason != nullptr) {
    TORCH_WARN("fastfa: the cuda backend runs conv2d ", reason, " on the aten path (cuDNN)");
  } else if (input.numel() == 0 || weight.numel() == 0) {
    reason = kEmpty;
  }
  if (reason != nullptr) {
    record_fallback("cuda_conv2d", reason);
    return conv2d_forward(input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale,
                          distribution, alignment, activation);
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = layout_of(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  // The forward's B is W as out_channels x taps in the layout's tap order: its contiguous form.
  const at::Tensor w = weight.contiguous(format);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(output, input.options().memory_format(format));
  const ForwardOutputs outputs = forward_outputs(y, b, kind, rule);
  const gemm::ConvShape shape = conv_shape(input, weight, output, stride, padding, dilation, channels_last);
  const at::Tensor x = within_32bit_offsets(input, format);
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(with_element(input.scalar_type(),
                            [&](auto element) {
                              return gemm::conv_forward_gemm<decltype(element)>(
                                  arch, shape, x.const_data_ptr(), strides_of(x), w.const_data_ptr(),
                                  y.mutable_data_ptr(), strides_of(y), outputs.epilogue, stream);
                            }),
               "conv2d forward");
  return {y, outputs.saved, outputs.projection};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_conv2d_arguments(input, weight, std::nullopt, groups);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(alignment.size() == 4, "fastfa: alignment must be [alpha, beta, gamma, sigma], got ",
              alignment.size(), " values");
  check_geometry(stride, padding, dilation);
  device_activation(activation);  // refuses an unknown name before any kernel runs
  const std::vector<int64_t> output = conv2d_output_shape(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(output), "fastfa: grad_output must have the output's shape ",
              at::IntArrayRef(output), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              "fastfa: grad_output must have input's dtype and device (", input.scalar_type(), ", ", input.device(),
              "), got ", grad_output.scalar_type(), ", ", grad_output.device());
  const auto kind = static_cast<Rule>(rule);
  const at::MemoryFormat format = layout_of(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const gemm::ConvShape shape = conv_shape(input, weight, output, stride, padding, dilation, channels_last);
  if (!cuda_fused_passes()) {
    // The vendor passes (aten's backward, on delta), grad_input on the implicit GEMM where the
    // model says it pays (rows: the output's pixels, the GEMM's FLOPs over W's size). Only where
    // the implicit GEMM can run it: not an empty tensor (nothing to launch), nor a strided
    // convolution (stride^2 the work), nor what conv_aten_path_reason names; cuDNN there is the
    // chosen path, not a fallback, so nothing is recorded.
    const c10::cuda::CUDAGuard device_guard(input.device());
    const bool empty = input.numel() == 0 || grad_output.numel() == 0 || weight.numel() == 0;
    const bool fused_input = output_mask[0] && !empty && stride[0] == 1 && stride[1] == 1 &&
                             conv_aten_path_reason(input, weight, output, groups) == nullptr &&
                             grad_input_on_fused_kernel(kind, feedback, distribution,
                                                        grad_output.numel() / weight.size(0), weight, !channels_last);
    const at::Tensor delta = activation_delta(grad_output, activation_saved, activation);
    auto gradients = conv2d_backward(delta, input, weight, feedback, rng, delta.new_empty({0}), projection, stride,
                                     padding, dilation, groups, rule, scale, distribution, alignment, "none",
                                     {output_mask[0] && !fused_input, output_mask[1], output_mask[2], output_mask[3]});
    if (fused_input) {
      std::get<0>(gradients) = fused_grad_input(within_32bit_offsets(delta, format), input, weight, feedback, rng,
                                                kind, scale, distribution, shape, format);
    }
    return gradients;
  }
  const char* reason = conv_aten_path_reason(input, weight, output, groups);
  if (reason != nullptr) {
    TORCH_WARN("fastfa: the cuda backend runs conv2d's backward ", reason, " on the aten path (cuDNN)");
  } else if (input.numel() == 0 || grad_output.numel() == 0 || weight.numel() == 0) {
    reason = kEmpty;
  }
  if (reason != nullptr) {
    record_fallback("cuda_conv2d_backward", reason);
    return conv2d_backward(grad_output, input, weight, feedback, rng, activation_saved, projection, stride, padding,
                           dilation, groups, rule, scale, distribution, alignment, activation, output_mask);
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool feedback_grad = output_mask[3] && estimates_feedback(kind);
  const at::Tensor delta = within_32bit_offsets(activation_delta(grad_output, activation_saved, activation), format);
  const at::Tensor x = within_32bit_offsets(input, format);
  const gemm::Arch arch = device_arch(input);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_input, grad_weight, grad_bias, grad_feedback;
  if (output_mask[0] && (stride[0] > 1 || stride[1] > 1)) {
    TORCH_WARN("fastfa: the cuda backend runs grad_input of a strided conv2d on the aten path (cuDNN after "
                    "the CUDA transform kernel); its implicit GEMM would do stride^2 the work");
    record_fallback("cuda_conv2d_backward", kStridedGradInput);
    grad_input = std::get<0>(conv2d_backward(grad_output, input, weight, feedback, rng, activation_saved, projection,
                                             stride, padding, dilation, groups, rule, scale, distribution, alignment,
                                             activation, {true, false, false, false}));
  } else if (output_mask[0]) {
    grad_input = fused_grad_input(delta, input, weight, feedback, rng, kind, scale, distribution, shape, format);
  }
  const bool needs_grad_weight = output_mask[1] || (feedback_grad && kind == Rule::kKolenPollack);
  if (needs_grad_weight || output_mask[2]) {
    const int64_t out_channels = weight.size(0), taps = weight.numel() / out_channels;
    const int64_t pixels = grad_output.numel() / out_channels;
    const int64_t per_split = k_tiles_per_split(input, out_channels, taps, pixels);
    const int64_t splits = std::max<int64_t>(1, (k_tiles(input, pixels) + per_split - 1) / per_split);
    const auto fp32 = input.options().dtype(at::kFloat);
    at::Tensor partial = at::empty({splits, out_channels, taps}, fp32);
    at::Tensor partial_sums = at::empty({splits, out_channels}, fp32);
    check_launch(with_element(input.scalar_type(),
                              [&](auto element) {
                                return gemm::conv_grad_weight_gemm<decltype(element)>(
                                    arch, shape, delta.const_data_ptr(), strides_of(delta), x.const_data_ptr(),
                                    strides_of(x), partial.mutable_data_ptr<float>(),
                                    partial_sums.mutable_data_ptr<float>(), per_split, stream);
                              }),
                 "conv2d grad_weight");
    if (needs_grad_weight) {
      // Columns are taps in the layout's order: (c, kh, kw), or (kh, kw, c) for channels_last.
      const at::Tensor sum = partial.sum(0);
      grad_weight = channels_last ? sum.view({out_channels, weight.size(2), weight.size(3), weight.size(1)})
                                        .permute({0, 3, 1, 2})
                                  : sum.view(weight.sizes());
      grad_weight = grad_weight.to(weight.scalar_type());
    }
    if (output_mask[2]) {
      grad_bias = partial_sums.sum(0).to(weight.scalar_type());
    }
  }
  if (feedback_grad) {
    const double alpha = alignment[0], beta = alignment[1];
    if (kind == Rule::kKolenPollack) {  // grad_W + alpha * decay
      grad_feedback = (grad_weight + *feedback * (2.0 * alpha)).contiguous(feedback->suggest_memory_format());
    } else if (kind == Rule::kSymmetricAlignment) {  // alpha * decay + beta * self
      grad_feedback = (*feedback * (2.0 * alpha) - weight * beta).contiguous(feedback->suggest_memory_format());
    } else {
      // wm, aa, ia: the aten backend's alignment convolutions (cuDNN), not fused here.
      record_fallback("cuda_conv2d_backward", kFeedbackGradientOnAten);
      grad_feedback = std::get<3>(conv2d_backward(grad_output, input, weight, feedback, rng, activation_saved,
                                                  projection, stride, padding, dilation, groups, rule, scale,
                                                  distribution, alignment, activation, {false, false, false, true}));
    }
  }
  return {output_mask[0] ? grad_input : input.new_empty({0}), output_mask[1] ? grad_weight : weight.new_empty({0}),
          output_mask[2] ? grad_bias : weight.new_empty({0}), feedback_grad ? grad_feedback : weight.new_empty({0})};
}

} // namespace fastfa
