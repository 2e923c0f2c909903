// fastfa._C.LayerCall: a module's resolved layer op call, so that a training step's forward is one
// call from Python into C++.
//
// Calling torch.ops.fastfa.conv2d.default from Python matches its 14 arguments against the schema
// and converts each to an IValue on every call (10+ µs on a small CPU, more than torch's whole
// Conv2d step); the module's static arguments (rule, scale, distribution, alignment, activation,
// conv2d's geometry) never change between calls. A LayerCall keeps them, and the op's typed
// handle, from the call that resolved them (fastfa.nn's _resolve_call), and takes only the
// tensors. The op is still called through the dispatcher: its autograd (csrc/autograd.cpp),
// Python dispatch modes and every C++ check of its arguments run as for any other call.
#include "fastfa/autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastfa {
namespace {

using at::Tensor;

using LinearSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, int64_t, double, int64_t, at::ArrayRef<double>, c10::string_view);
using Conv2dSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double,
    int64_t, at::ArrayRef<double>, c10::string_view);

class LayerCall {
 public:
  // A linear op with fastfa::linear's schema (fastfa::linear, fastfa::cuda_linear).
  static LayerCall linear(const std::string& op, int64_t rule, double scale, int64_t distribution,
                          std::vector<double> alignment, std::string activation, bool draws) {
    LayerCall call(rule, scale, distribution, std::move(alignment), std::move(activation), draws);
    call.linear_ = find(op).typed<LinearSignature>();
    return call;
  }

  // A conv2d op with fastfa::conv2d's schema (fastfa::conv2d, fastfa::cuda_conv2d).
  static LayerCall conv2d(const std::string& op, std::vector<int64_t> stride, std::vector<int64_t> padding,
                          std::vector<int64_t> dilation, int64_t groups, int64_t rule, double scale,
                          int64_t distribution, std::vector<double> alignment, std::string activation, bool draws) {
    LayerCall call(rule, scale, distribution, std::move(alignment), std::move(activation), draws);
    call.conv2d_ = find(op).typed<Conv2dSignature>();
    call.stride_ = std::move(stride);
    call.padding_ = std::move(padding);
    call.dilation_ = std::move(dilation);
    call.groups_ = groups;
    return call;
  }

  // The layer's output. rng is the layer's own [seed, step] counter for the rules that draw
  // (brsf, wm), else None: where a backward is recorded, the op gets a copy (its backward reads
  // this step's draw even if another forward runs first) and the counter moves on in place, on
  // its device, after the op, so that a refused call leaves it where it was and a CUDA graph's
  // replay advances it too.
  Tensor operator()(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& feedback, const std::optional<Tensor>& rng) const {
    const bool advance = draws_ && rng.has_value() && rng->defined() && at::GradMode::is_enabled();
    const bool on_host = advance && plain_cpu_counter(*rng);
    std::optional<Tensor> step_rng = rng;
    if (on_host) {
      step_rng = at::detail::empty_cpu({2}, at::kLong);
      const int64_t* counter = rng->const_data_ptr<int64_t>();
      int64_t* copy = step_rng->mutable_data_ptr<int64_t>();
      copy[0] = counter[0];
      copy[1] = counter[rng->stride(0)];
    } else if (advance) {
      step_rng = rng->clone();
    }
    const c10::DeviceType device = input.device().type();
    const Tensor output = autocasting(device) ? call_autocast(input, weight, bias, feedback, step_rng, device)
                                              : call_op(input, weight, bias, feedback, step_rng);
    if (on_host) {
      rng->mutable_data_ptr<int64_t>()[rng->stride(0)] += 1;
      rng->unsafeGetTensorImpl()->bump_version(); // as add_ would: autograd sees the write
    } else if (advance) {
      // A wrapped number, as Python's `+= 1` passes it: add_(Scalar) would copy 1 into a tensor first.
      rng->select(0, 1).add_(at::native::wrapped_scalar_tensor(c10::Scalar(int64_t{1})));
    }
    return output;
  }

 private:
  LayerCall(int64_t rule, double scale, int64_t distribution, std::vector<double> alignment, std::string activation,
            bool draws)
      : rule_(rule), scale_(scale), distribution_(distribution), alignment_(std::move(alignment)),
        activation_(std::move(activation)), draws_(draws) {}

  Tensor call_op(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& feedback, const std::optional<Tensor>& rng) const {
    if (linear_) {
      return std::get<0>(
          linear_->call(input, weight, bias, feedback, rng, rule_, scale_, distribution_, alignment_, activation_));
    }
    return std::get<0>(conv2d_->call(input, weight, bias, feedback, rng, stride_, padding_, dilation_, groups_, rule_,
                                     scale_, distribution_, alignment_, activation_));
  }

  // Under autocast on the input's device (CPU or CUDA) the layer runs in the autocast dtype, as
  // torch's own linear / conv2d do: every floating tensor argument is cast, as fastfa.functional's
  // checked path casts them (so autocast, the usual GPU training mode, keeps the one-call path).
  // The op has no autocast kernel of its own: it computes in the dtype it is given.
  static bool autocasting(c10::DeviceType device) {
    return (device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA) &&
           at::autocast::is_autocast_enabled(device);
  }

  // The estimated rules' B is a Parameter (fp32 under mixed precision): its cast records no node of
  // its own here, and the op's node hands B's gradient to B itself, which the autograd engine casts
  // to B's dtype as the cast's node (ToCopyBackward) would (route_feedback_gradient). The same
  // values and the same two casts as the checked path's, with one autograd node less per step (its
  // making, its edges, its turn in the engine). Where the op records no node (no other argument
  // needs a gradient), B keeps the cast's node.
  Tensor call_autocast(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& feedback, const std::optional<Tensor>& rng,
                       c10::DeviceType device) const {
    const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
    const Tensor cast_input = cast(input, dtype), cast_weight = cast(weight, dtype);
    const std::optional<Tensor> cast_bias = cast(bias, dtype);
    const bool route = feedback.has_value() && feedback->defined() && feedback->requires_grad() &&
                       feedback->is_floating_point() && feedback->scalar_type() != dtype &&
                       at::GradMode::is_enabled() &&
                       (input.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
    if (!route) return call_op(cast_input, cast_weight, cast_bias, cast(feedback, dtype), rng);
    Tensor cast_feedback;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd; // a copy without autograd history
      cast_feedback = feedback->to(dtype);
    }
    const Tensor output = call_op(cast_input, cast_weight, cast_bias, cast_feedback, rng);
    // The op's autograd kernel records its node for any call that needs a gradient: the check is
    // for a Python dispatch mode that hands back something else.
    TORCH_CHECK(route_feedback_gradient(output, *feedback),
                "fastfa: the layer op's output has no fastfa backward node to hand B's gradient to");
    return output;
  }

  static Tensor cast(const Tensor& t, at::ScalarType dtype) {
    return t.is_floating_point() ? t.to(dtype) : t;
  }

  static std::optional<Tensor> cast(const std::optional<Tensor>& t, at::ScalarType dtype) {
    return t.has_value() && t->defined() ? std::optional<Tensor>(cast(*t, dtype)) : t;
  }

  // A counter that is only memory: an int64 [seed, step] on the CPU, not an inference tensor (whose
  // in-place update outside inference mode the op would refuse), under no Python dispatch mode or
  // subclass (whose tensors may hold no data). Its copy and step then need no op dispatch
  // (clone, select, add_: a third of brsf's host time on a small layer). Anything else, and a
  // CUDA counter (advanced on its device, in place, so that a graph replay moves it too), takes
  // the ops.
  static bool plain_cpu_counter(const Tensor& rng) {
    return rng.is_cpu() && rng.layout() == at::kStrided && rng.scalar_type() == at::kLong && rng.dim() == 1 &&
           rng.size(0) == 2 && !rng.is_inference() && !rng.unsafeGetTensorImpl()->is_python_dispatch() &&
           !c10::impl::dispatch_mode_enabled();
  }

  static c10::OperatorHandle find(const std::string& op) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), "");
  }

  std::optional<c10::TypedOperatorHandle<LinearSignature>> linear_;
  std::optional<c10::TypedOperatorHandle<Conv2dSignature>> conv2d_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_ = 1;
  int64_t rule_;
  double scale_;
  int64_t distribution_;
  std::vector<double> alignment_;
  std::string activation_;
  bool draws_;
};

} // namespace

void bind_layer_call(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<LayerCall>(m, "LayerCall",
                        "A layer's resolved op call: the op and its static arguments, kept; called with the tensors "
                        "(input, weight, bias, feedback, rng) it returns the layer's output")
      .def_static("linear", &LayerCall::linear, py::arg("op"), py::arg("rule"), py::arg("scale"),
                  py::arg("distribution"), py::arg("alignment"), py::arg("activation"), py::arg("draws"))
      .def_static("conv2d", &LayerCall::conv2d, py::arg("op"), py::arg("stride"), py::arg("padding"),
                  py::arg("dilation"), py::arg("groups"), py::arg("rule"), py::arg("scale"), py::arg("distribution"),
                  py::arg("alignment"), py::arg("activation"), py::arg("draws"))
      .def("__call__", &LayerCall::operator());
}

} // namespace fastfa
