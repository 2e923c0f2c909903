// Autograd for the layer ops, in C++: a training step runs no Python between a module's
// forward call and the backend's kernels (torch.library's Python autograd wrapper cost a
// layer 100+ µs of host time per step on a small CPU, more than torch's whole layer).
//
// Each forward op (fastfa::linear, fastfa::cuda_linear, ...) gets a torch::autograd::Function
// registered for the Autograd key (pytorch/vision's pattern): its forward redispatches to the
// backend's kernel below autograd, saves what the backward op reads, and its backward calls
// that backend's backward op (fastfa::linear_backward, ...) through the dispatcher, so the
// fake kernels, torch.compile and opcheck see the same op calls as before. The Triton ops are
// defined in Python (torch.library.triton_op) and keep their autograd there (ops.py).
#include "fastfa/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastfa {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, int64_t, double, int64_t, at::ArrayRef<double>, c10::string_view);
using LinearBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, int64_t, double, int64_t, at::ArrayRef<double>, c10::string_view,
    std::array<bool, 4>);
using Conv2dSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double,
    int64_t, at::ArrayRef<double>, c10::string_view);
using Conv2dBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double,
    int64_t, at::ArrayRef<double>, c10::string_view, std::array<bool, 4>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// relu, tanh and sigmoid differentiate from their output (which autograd keeps anyway);
// gelu and silu from the pre-activation, the forward op's second output.
bool derivative_from_output(c10::string_view activation) {
  return activation == "relu" || activation == "tanh" || activation == "sigmoid";
}

bool given(const std::optional<Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

// What both layer kinds keep for the backward: the tensors the backward op reads, the
// feedback description, and where input, weight, bias and feedback sit among the Function's
// edges (an absent optional tensor has none), for needs_input_grad.
void save_common(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& feedback,
                 const std::optional<Tensor>& rng, const std::tuple<Tensor, Tensor, Tensor>& outputs,
                 int64_t rule, double scale, int64_t distribution, at::ArrayRef<double> alignment,
                 c10::string_view activation) {
  const Tensor& activation_tensor =
      derivative_from_output(activation) ? std::get<0>(outputs) : std::get<1>(outputs);
  ctx->save_for_backward({input, weight, given(feedback) ? *feedback : Tensor(), given(rng) ? *rng : Tensor(),
                          activation_tensor, std::get<2>(outputs)});
  // Only the output's gradient is read: zeros for the other two outputs would be made and
  // thrown away on every step. An output the loss did not reach gets zeros in the backward
  // (the estimated rules' B gradient has terms that do not vanish with it).
  ctx->set_materialize_grads(false);
  ctx->saved_data["has_bias"] = given(bias);
  ctx->saved_data["has_feedback"] = given(feedback);
  ctx->saved_data["has_rng"] = given(rng);
  ctx->saved_data["rule"] = rule;
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["distribution"] = distribution;
  ctx->saved_data["alignment"] = alignment.vec();
  ctx->saved_data["activation"] = std::string(activation);
}

struct Saved {
  Tensor input, weight, activation_saved, projection;
  std::optional<Tensor> feedback, rng;
  int64_t rule, distribution;
  double scale;
  std::vector<double> alignment;
  std::string activation;
  std::array<bool, 4> output_mask;
};

Saved unpack(AutogradContext* ctx) {
  auto tensors = ctx->get_saved_variables();
  Saved saved;
  saved.input = tensors[0];
  saved.weight = tensors[1];
  bool has_bias = ctx->saved_data["has_bias"].toBool();
  bool has_feedback = ctx->saved_data["has_feedback"].toBool();
  if (has_feedback) saved.feedback = tensors[2];
  if (ctx->saved_data["has_rng"].toBool()) saved.rng = tensors[3];
  saved.activation_saved = tensors[4];
  saved.projection = tensors[5];
  saved.rule = ctx->saved_data["rule"].toInt();
  saved.scale = ctx->saved_data["scale"].toDouble();
  saved.distribution = ctx->saved_data["distribution"].toInt();
  saved.alignment = ctx->saved_data["alignment"].toDoubleVector();
  saved.activation = ctx->saved_data["activation"].toStringRef();
  // Edges: input 0, weight 1, then bias and feedback where given.
  size_t feedback_edge = has_bias ? 3 : 2;
  saved.output_mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2),
                       has_feedback && ctx->needs_input_grad(feedback_edge)};
  return saved;
}

// The backward op's outputs as the Function returns them: one per forward argument, undefined
// where not needed and for the non-tensor arguments.
variable_list gradients(const std::tuple<Tensor, Tensor, Tensor, Tensor>& computed,
                        const std::array<bool, 4>& mask, size_t arguments) {
  variable_list result(arguments);
  if (mask[0]) result[0] = std::get<0>(computed);
  if (mask[1]) result[1] = std::get<1>(computed);
  if (mask[2]) result[2] = std::get<2>(computed);
  if (mask[3]) result[3] = std::get<3>(computed);
  return result;
}

// Op names of one backend's linear (Backend::linear and Backend::linear_backward).
template <typename Backend>
struct LinearFunction : public torch::autograd::Function<LinearFunction<Backend>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& feedback,
                               const std::optional<Tensor>& rng, int64_t rule, double scale, int64_t distribution,
                               at::ArrayRef<double> alignment, c10::string_view activation) {
    static auto op = find_op<LinearSignature>(Backend::linear);
    std::tuple<Tensor, Tensor, Tensor> outputs;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      outputs = op.call(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
    }
    save_common(ctx, input, weight, bias, feedback, rng, outputs, rule, scale, distribution, alignment, activation);
    return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = find_op<LinearBackwardSignature>(Backend::linear_backward);
    Saved saved = unpack(ctx);
    Tensor grad_output = grad_outputs[0];
    if (!grad_output.defined()) {
      std::vector<int64_t> output_sizes = saved.input.sizes().vec();
      output_sizes.back() = saved.weight.size(0);
      grad_output = at::zeros(output_sizes, saved.input.options());
    }
    auto computed = op.call(grad_output, saved.input, saved.weight, saved.feedback, saved.rng,
                            saved.activation_saved, saved.projection, saved.rule, saved.scale, saved.distribution,
                            saved.alignment, saved.activation, saved.output_mask);
    return gradients(computed, saved.output_mask, 10);
  }
};

template <typename Backend>
struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction<Backend>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& feedback,
                               const std::optional<Tensor>& rng, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
                               int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
    static auto op = find_op<Conv2dSignature>(Backend::conv2d);
    std::tuple<Tensor, Tensor, Tensor> outputs;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      outputs = op.call(input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale,
                        distribution, alignment, activation);
    }
    save_common(ctx, input, weight, bias, feedback, rng, outputs, rule, scale, distribution, alignment, activation);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = find_op<Conv2dBackwardSignature>(Backend::conv2d_backward);
    Saved saved = unpack(ctx);
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const Tensor grad_output =
        grad_outputs[0].defined()
            ? grad_outputs[0]
            : at::zeros(conv2d_output_shape(saved.input, saved.weight, stride, padding, dilation),
                        saved.input.options());
    auto computed = op.call(grad_output, saved.input, saved.weight, saved.feedback, saved.rng, saved.activation_saved,
                            saved.projection, stride, padding, dilation, ctx->saved_data["groups"].toInt(),
                            saved.rule, saved.scale, saved.distribution, saved.alignment, saved.activation,
                            saved.output_mask);
    return gradients(computed, saved.output_mask, 14);
  }
};

std::tuple<Tensor, Tensor, Tensor> as_tuple(const variable_list& outputs) {
  return {outputs[0], outputs[1], outputs[2]};
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> linear_autograd(const Tensor& input, const Tensor& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& feedback,
                                                   const std::optional<Tensor>& rng, int64_t rule, double scale,
                                                   int64_t distribution, at::ArrayRef<double> alignment,
                                                   c10::string_view activation) {
  return as_tuple(LinearFunction<Backend>::apply(input, weight, bias, feedback, rng, rule, scale, distribution,
                                                 alignment, activation));
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> conv2d_autograd(const Tensor& input, const Tensor& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& feedback,
                                                   const std::optional<Tensor>& rng, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                   int64_t rule, double scale, int64_t distribution,
                                                   at::ArrayRef<double> alignment, c10::string_view activation) {
  return as_tuple(Conv2dFunction<Backend>::apply(input, weight, bias, feedback, rng, stride, padding, dilation,
                                                 groups, rule, scale, distribution, alignment, activation));
}

struct AtenOps {
  static constexpr const char* linear = "fastfa::linear";
  static constexpr const char* linear_backward = "fastfa::linear_backward";
  static constexpr const char* conv2d = "fastfa::conv2d";
  static constexpr const char* conv2d_backward = "fastfa::conv2d_backward";
};

struct CudaOps {
  static constexpr const char* linear = "fastfa::cuda_linear";
  static constexpr const char* linear_backward = "fastfa::cuda_linear_backward";
  static constexpr const char* conv2d = "fastfa::cuda_conv2d";
  static constexpr const char* conv2d_backward = "fastfa::cuda_conv2d_backward";
};

} // namespace
} // namespace fastfa

TORCH_LIBRARY_IMPL(fastfa, Autograd, m) {
  m.impl("linear", &fastfa::linear_autograd<fastfa::AtenOps>);
  m.impl("conv2d", &fastfa::conv2d_autograd<fastfa::AtenOps>);
  m.impl("cuda_linear", &fastfa::linear_autograd<fastfa::CudaOps>);
  m.impl("cuda_conv2d", &fastfa::conv2d_autograd<fastfa::CudaOps>);
}
