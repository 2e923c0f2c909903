// Autograd for the layer ops, in C++: a training step runs no Python between a module's
// forward call and the backend's kernels (torch.library's Python autograd wrapper cost a
// layer 100+ µs of host time per step on a small CPU, more than torch's whole layer).
//
// Each forward op (fastfa::linear, fastfa::cuda_linear, ...) gets a kernel for the Autograd key
// that redispatches to the backend's kernel below autograd and records an autograd node, as
// torch's own generated code does: the node keeps what the backward op reads in its members
// (torch::autograd::Function would keep the scalars in a map of named values, built on every
// step), and its backward calls that backend's backward op (fastfa::linear_backward, ...)
// through the dispatcher, so the fake kernels, torch.compile and opcheck see the same op calls
// as before.
//
// The Triton ops (fastfa::triton_linear, fastfa::triton_conv2d) are defined in Python, on first use
// (torch.library.triton_op in triton_kernels/), which registers torch.library's Python autograd
// wrapper for the Autograd alias key. Their kernels here are registered for AutogradCPU and
// AutogradCUDA, the devices the Triton kernels run on: the dispatcher takes a kernel registered for
// a device's own Autograd key before the alias's, so it replaces the Python one on those devices
// whichever registers first (these at load, before the op is defined), without an override. The
// Python formula (ops.py) is left for the other devices, where the Triton ops hand the call to the
// aten ops. Their schemas read SymInt for int and bool[] for bool[4]: the dispatcher compares a
// kernel's inferred schema with the op's by the types C++ sees (int, a list of bool), so the aten
// ops' signatures serve them; rule, distribution and the geometry are never symbolic.
#include "fastfa/autograd.h"
#include "fastfa/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastfa {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
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

// torch 2.14 holds autograd nodes in c10::intrusive_ptr, torch 2.11 in std::shared_ptr (with
// deleteNode, which keeps a long graph's destruction off the stack); both are served here.
template <typename NodeType>
constexpr bool kIntrusiveNodes = std::is_base_of_v<c10::intrusive_ptr_target, NodeType>;

template <typename NodeType>
auto make_node() {
  if constexpr (kIntrusiveNodes<NodeType>) {
    return c10::make_intrusive<NodeType>();
  } else {
    return std::shared_ptr<NodeType>(new NodeType(), [](NodeType* node) { deleteNode(node); });
  }
}

// What every layer op's backward node is, whatever the layer kind and backend: the edges input 0,
// weight 1, bias 2, feedback 3 (an absent optional tensor's edge is invalid, so needs no gradient).
struct LayerNode : public Node {
  static constexpr size_t kFeedbackEdge = 3;
};

// The backward of one layer op call: what the backend's backward op reads, kept in members
// (no per-step map of named values), and LayerNode's edges. Layer supplies the backward op's
// call and the output's shape (the loss may not reach the output, only the other outputs).
template <typename Layer>
struct LayerBackward : public LayerNode {
  SavedVariable input_, weight_, feedback_, rng_, activation_saved_, projection_;
  bool has_feedback_ = false, has_rng_ = false;
  int64_t rule_ = 0, distribution_ = 0;
  double scale_ = 1.0;
  c10::SmallVector<double, 4> alignment_;
  std::string activation_;
  typename Layer::Geometry geometry_;

  std::string name() const override { return Layer::kNodeName; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&input_, &weight_, &feedback_, &rng_, &activation_saved_, &projection_}) {
      saved->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto self = this_node();
    const Tensor input = input_.unpack(), weight = weight_.unpack();
    const Tensor activation_saved = activation_saved_.unpack(self), projection = projection_.unpack(self);
    std::optional<Tensor> feedback, rng;
    if (has_feedback_) feedback = feedback_.unpack();
    if (has_rng_) rng = rng_.unpack();
    const std::array<bool, 4> mask{should_compute_output(0), should_compute_output(1), should_compute_output(2),
                                   should_compute_output(3)};
    // An output the loss did not reach gets zeros (the estimated rules' B gradient has terms
    // that do not vanish with it).
    const Tensor grad_output = grads[0].defined()
                                   ? grads[0]
                                   : at::zeros(Layer::output_shape(input, weight, geometry_), input.options());
    // The backward ops have no derivative of their own: below autograd, they skip torch's boxed
    // "not implemented" wrapper. Where the graph is being recorded (create_graph), they go
    // through it as before, so that torch still says the backward op has no derivative.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const auto computed = Layer::backward(grad_output, input, weight, feedback, rng, activation_saved, projection,
                                          geometry_, rule_, scale_, distribution_, alignment_, activation_, mask);
    variable_list result(4);
    if (mask[0]) result[0] = std::get<0>(computed);
    if (mask[1]) result[1] = std::get<1>(computed);
    if (mask[2]) result[2] = std::get<2>(computed);
    if (mask[3]) result[3] = std::get<3>(computed);
    return result;
  }

  // Becomes the outputs' grad_fn (when a differentiable argument requires grad) and keeps
  // what the backward reads; returns itself for the caller to add the geometry, or null.
  static auto record(const std::tuple<Tensor, Tensor, Tensor>& outputs, const Tensor& input, const Tensor& weight,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& feedback,
                     const std::optional<Tensor>& rng, int64_t rule, double scale, int64_t distribution,
                     at::ArrayRef<double> alignment, c10::string_view activation) {
    decltype(make_node<LayerBackward>()) node;
    if (!torch::autograd::compute_requires_grad(input, weight, bias, feedback)) return node;
    node = make_node<LayerBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, feedback));
    const auto& [output, pre_activation, projection] = outputs;
    torch::autograd::set_history(output, node);
    // The pre-activation and projection get a history where the backend returns them; where it returns
    // a placeholder instead (1-D, 0 elements: empty_output), they get none: nothing can differentiate
    // through it, and without a history it costs the step no autograd metadata, no input slot in the
    // node, and no detached copy to save and re-wrap (SavedVariable of an output). Every real one has
    // the output's shape, and a placeholder has it only when the output is empty too.
    for (const Tensor* tensor : {&pre_activation, &projection}) {
      if (tensor->sizes() == output.sizes()) torch::autograd::set_history(*tensor, node);
    }
    node->input_ = SavedVariable(input, /*is_output=*/false);
    node->weight_ = SavedVariable(weight, false);
    node->has_feedback_ = feedback.has_value() && feedback->defined();
    if (node->has_feedback_) node->feedback_ = SavedVariable(*feedback, false);
    node->has_rng_ = rng.has_value() && rng->defined();
    if (node->has_rng_) node->rng_ = SavedVariable(*rng, false);
    // Outputs are saved as outputs: the node does not hold itself through them.
    node->activation_saved_ = SavedVariable(derivative_from_output(activation) ? output : pre_activation, true);
    node->projection_ = SavedVariable(projection, true);
    node->rule_ = rule;
    node->scale_ = scale;
    node->distribution_ = distribution;
    node->alignment_.assign(alignment.begin(), alignment.end());
    node->activation_.assign(activation.data(), activation.size());
    return node;
  }

 private:
  auto this_node() {
    if constexpr (kIntrusiveNodes<LayerBackward>) {
      return this->getptr();
    } else {
      return this->shared_from_this();
    }
  }
};

using Masks = std::array<bool, 4>;
using Gradients = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Backend>
struct LinearLayer {
  struct Geometry {};
  static constexpr const char* kNodeName = Backend::linear_node;

  static std::vector<int64_t> output_shape(const Tensor& input, const Tensor& weight, const Geometry&) {
    std::vector<int64_t> sizes = input.sizes().vec();
    sizes.back() = weight.size(0);
    return sizes;
  }

  static Gradients backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& feedback, const std::optional<Tensor>& rng,
                            const Tensor& activation_saved, const Tensor& projection, const Geometry&, int64_t rule,
                            double scale, int64_t distribution, at::ArrayRef<double> alignment,
                            c10::string_view activation, Masks mask) {
    static auto op = find_op<LinearBackwardSignature>(Backend::linear_backward);
    return op.call(grad_output, input, weight, feedback, rng, activation_saved, projection, rule, scale, distribution,
                   alignment, activation, mask);
  }
};

template <typename Backend>
struct Conv2dLayer {
  struct Geometry {
    c10::SmallVector<int64_t, 2> stride, padding, dilation;
    int64_t groups = 1;
  };
  static constexpr const char* kNodeName = Backend::conv2d_node;

  static std::vector<int64_t> output_shape(const Tensor& input, const Tensor& weight, const Geometry& geometry) {
    return conv2d_output_shape(input, weight, geometry.stride, geometry.padding, geometry.dilation);
  }

  static Gradients backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& feedback, const std::optional<Tensor>& rng,
                            const Tensor& activation_saved, const Tensor& projection, const Geometry& geometry,
                            int64_t rule, double scale, int64_t distribution, at::ArrayRef<double> alignment,
                            c10::string_view activation, Masks mask) {
    static auto op = find_op<Conv2dBackwardSignature>(Backend::conv2d_backward);
    return op.call(grad_output, input, weight, feedback, rng, activation_saved, projection, geometry.stride,
                   geometry.padding, geometry.dilation, geometry.groups, rule, scale, distribution, alignment,
                   activation, mask);
  }
};

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> linear_autograd(const Tensor& input, const Tensor& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& feedback,
                                                   const std::optional<Tensor>& rng, int64_t rule, double scale,
                                                   int64_t distribution, at::ArrayRef<double> alignment,
                                                   c10::string_view activation) {
  static auto op = find_op<LinearSignature>(Backend::linear);
  std::tuple<Tensor, Tensor, Tensor> outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = op.call(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation);
  }
  LayerBackward<LinearLayer<Backend>>::record(outputs, input, weight, bias, feedback, rng, rule, scale, distribution,
                                              alignment, activation);
  return outputs;
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> conv2d_autograd(const Tensor& input, const Tensor& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const std::optional<Tensor>& feedback,
                                                   const std::optional<Tensor>& rng, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                   int64_t rule, double scale, int64_t distribution,
                                                   at::ArrayRef<double> alignment, c10::string_view activation) {
  static auto op = find_op<Conv2dSignature>(Backend::conv2d);
  std::tuple<Tensor, Tensor, Tensor> outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = op.call(input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale, distribution,
                      alignment, activation);
  }
  if (auto node = LayerBackward<Conv2dLayer<Backend>>::record(outputs, input, weight, bias, feedback, rng, rule, scale,
                                                              distribution, alignment, activation)) {
    node->geometry_ = {c10::SmallVector<int64_t, 2>(stride.begin(), stride.end()),
                       c10::SmallVector<int64_t, 2>(padding.begin(), padding.end()),
                       c10::SmallVector<int64_t, 2>(dilation.begin(), dilation.end()), groups};
  }
  return outputs;
}

struct AtenOps {
  static constexpr const char* linear = "fastfa::linear";
  static constexpr const char* linear_backward = "fastfa::linear_backward";
  static constexpr const char* conv2d = "fastfa::conv2d";
  static constexpr const char* conv2d_backward = "fastfa::conv2d_backward";
  static constexpr const char* linear_node = "fastfa::LinearBackward";
  static constexpr const char* conv2d_node = "fastfa::Conv2dBackward";
};

struct CudaOps {
  static constexpr const char* linear = "fastfa::cuda_linear";
  static constexpr const char* linear_backward = "fastfa::cuda_linear_backward";
  static constexpr const char* conv2d = "fastfa::cuda_conv2d";
  static constexpr const char* conv2d_backward = "fastfa::cuda_conv2d_backward";
  static constexpr const char* linear_node = "fastfa::CudaLinearBackward";
  static constexpr const char* conv2d_node = "fastfa::CudaConv2dBackward";
};

struct TritonOps {
  static constexpr const char* linear = "fastfa::triton_linear";
  static constexpr const char* linear_backward = "fastfa::triton_linear_backward";
  static constexpr const char* conv2d = "fastfa::triton_conv2d";
  static constexpr const char* conv2d_backward = "fastfa::triton_conv2d_backward";
  static constexpr const char* linear_node = "fastfa::TritonLinearBackward";
  static constexpr const char* conv2d_node = "fastfa::TritonConv2dBackward";
};

} // namespace

bool route_feedback_gradient(const Tensor& output, const Tensor& feedback) {
  auto* node = dynamic_cast<LayerNode*>(output.grad_fn().get());
  if (node == nullptr) return false;
  node->set_next_edge(LayerNode::kFeedbackEdge, torch::autograd::impl::gradient_edge(feedback));
  return true;
}

} // namespace fastfa

TORCH_LIBRARY_IMPL(fastfa, Autograd, m) {
  m.impl("linear", &fastfa::linear_autograd<fastfa::AtenOps>);
  m.impl("conv2d", &fastfa::conv2d_autograd<fastfa::AtenOps>);
  m.impl("cuda_linear", &fastfa::linear_autograd<fastfa::CudaOps>);
  m.impl("cuda_conv2d", &fastfa::conv2d_autograd<fastfa::CudaOps>);
}

// The Triton ops are defined later, in Python (see the header comment): these wait for the definition.
TORCH_LIBRARY_IMPL(fastfa, AutogradCPU, m) {
  m.impl("triton_linear", &fastfa::linear_autograd<fastfa::TritonOps>);
  m.impl("triton_conv2d", &fastfa::conv2d_autograd<fastfa::TritonOps>);
}

TORCH_LIBRARY_IMPL(fastfa, AutogradCUDA, m) {
  m.impl("triton_linear", &fastfa::linear_autograd<fastfa::TritonOps>);
  m.impl("triton_conv2d", &fastfa::conv2d_autograd<fastfa::TritonOps>);
}
