// dfa's join (fastfa/dfa.py) as a C++ autograd node: a dfa layer's output, computed by the bp op
// from a detached input, linked back to that input through grad_x = reshape(e B_l, x's shape).
//
// As a Python torch.autograd.Function it ran Python twice per layer and step (its apply and its
// backward, with e B_l's product chosen in Python): about as much host time as torch's whole
// small layer. Here the node keeps what the product needs; Python fills it once per model call,
// when the model's output is known (B_l's shape depends on it), and the output's hook stores e in
// the pass that every node of that call shares. The node serves every backend, through the
// dispatcher: aten (the small B_l kept on the layer, or drawn block by block by
// fastfa::direct_feedback_product), cuda (fastfa::cuda_direct_feedback_product) and triton
// (fastfa::triton_direct_feedback_product, registered from Python by torch.library.triton_op):
// the fused ones draw B_l's tiles inside the product. dfa.py chooses the backend in the layer's
// forward, as the layer's own op is chosen there.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastfa {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::variable_list;

// One call of a converted model: e = dL/d(model output), once the backward has reached the output.
struct DirectFeedbackPass {
  Tensor error;
};

// The backend whose product computes e B_l (dfa.py's _PRODUCT_BACKENDS numbers them).
enum class ProductBackend : int64_t { kAten = 0, kCuda = 1, kTriton = 2 };

// One dfa layer's call in a pass: B_l's shape (set when the model's forward returns) and source.
struct DirectFeedbackProjection {
  Tensor feedback;  // B_l (K x F), kept on the layer where small (aten); undefined: the backend's product
  Tensor rng;       // the layer's [seed, 0]
  ProductBackend backend = ProductBackend::kAten;
  int64_t output_width = 0, input_numel = 0, distribution = 0, block_elements = 0;
  double scale = 1.0;
  std::vector<int64_t> input_shape;
  bool ready = false;  // the model's forward has set the above
};

using ProductSignature = Tensor(const Tensor&, const Tensor&, int64_t, double, int64_t, int64_t);

c10::TypedOperatorHandle<ProductSignature> product_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<ProductSignature>();
}

// e B_l by the backend's op, looked up on its first use (one static per op: the cuda op exists in
// CUDA builds only, the triton op once fastfa.triton_kernels.direct_feedback is imported).
Tensor backend_product(const DirectFeedbackProjection& p, const Tensor& rows) {
  switch (p.backend) {
    case ProductBackend::kCuda: {
      static const auto op = product_op("fastfa::cuda_direct_feedback_product");
      return op.call(rows, p.rng, p.input_numel, p.scale, p.distribution, p.block_elements);
    }
    case ProductBackend::kTriton: {
      static const auto op = product_op("fastfa::triton_direct_feedback_product");
      return op.call(rows, p.rng, p.input_numel, p.scale, p.distribution, p.block_elements);
    }
    case ProductBackend::kAten:
      break;
  }
  static const auto op = product_op("fastfa::direct_feedback_product");
  return op.call(rows, p.rng, p.input_numel, p.scale, p.distribution, p.block_elements);
}

struct DirectFeedbackBackward : public Node {
  std::shared_ptr<DirectFeedbackPass> pass_;
  std::shared_ptr<DirectFeedbackProjection> projection_;
  at::ScalarType input_dtype_ = at::kFloat;
  std::string missing_error_;  // the message when the backward did not come through the model's output

  std::string name() const override { return "fastfa::DirectFeedbackBackward"; }

  // Inputs: 0 the bp op's output (grad_W, grad_b: grad_output passes on unchanged), 1 the layer's input.
  variable_list apply(variable_list&& grads) override {
    variable_list result(2);
    if (should_compute_output(0)) result[0] = grads[0];
    if (should_compute_output(1)) {
      TORCH_CHECK(pass_->error.defined() && projection_->ready, missing_error_);
      const DirectFeedbackProjection& p = *projection_;
      const Tensor rows = pass_->error.reshape({-1, p.output_width}).to(input_dtype_);
      const Tensor product = p.feedback.defined() ? at::mm(rows, p.feedback) : backend_product(p, rows);
      result[1] = product.reshape(p.input_shape);
    }
    return result;
  }
};

// torch 2.14 holds autograd nodes in c10::intrusive_ptr, torch 2.11 in std::shared_ptr with
// deleteNode (as csrc/autograd.cpp).
template <typename NodeType>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeType>) {
    return c10::make_intrusive<NodeType>();
  } else {
    return std::shared_ptr<NodeType>(new NodeType(), [](NodeType* node) { deleteNode(node); });
  }
}

// output with a new history whose node is DirectFeedbackBackward (output's data, as the Python
// Function's output.detach(): an in-place op after the layer, ReLU(inplace=True), stays allowed).
Tensor join(const Tensor& output, const Tensor& input, std::shared_ptr<DirectFeedbackPass> pass,
            std::shared_ptr<DirectFeedbackProjection> projection, std::string missing_error) {
  Tensor joined = output.detach();
  if (!torch::autograd::compute_requires_grad(output, input)) return joined;
  auto node = make_node<DirectFeedbackBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(output, input));
  node->pass_ = std::move(pass);
  node->projection_ = std::move(projection);
  node->input_dtype_ = input.scalar_type();
  node->missing_error_ = std::move(missing_error);
  torch::autograd::set_history(joined, node);
  return joined;
}

// e = dL/d(output) into pass when the backward reaches the model's output: a hook of the output
// tensor, which autograd runs before the output's own node, and so before every layer's.
void capture_error(const Tensor& output, std::shared_ptr<DirectFeedbackPass> pass) {
  output.register_hook([pass = std::move(pass)](const Tensor& grad) { pass->error = grad.detach(); });
}

} // namespace

void bind_direct_feedback(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<DirectFeedbackPass, std::shared_ptr<DirectFeedbackPass>>(
      m, "DirectFeedbackPass", "One call of a dfa-converted model: e = dL/d(model output) once the backward has it")
      .def(py::init<>())
      .def_readwrite("error", &DirectFeedbackPass::error);
  py::class_<DirectFeedbackProjection, std::shared_ptr<DirectFeedbackProjection>>(
      m, "DirectFeedbackProjection", "One dfa layer's call: B_l's shape and source for grad_x = e B_l")
      .def(py::init<>())
      .def("set",
           [](DirectFeedbackProjection& p, std::optional<Tensor> feedback, Tensor rng, int64_t output_width,
              int64_t input_numel, double scale, int64_t distribution, int64_t block_elements,
              std::vector<int64_t> input_shape, int64_t backend) {
             TORCH_CHECK(backend >= 0 && backend <= static_cast<int64_t>(ProductBackend::kTriton),
                         "fastfa: backend must be 0 (aten), 1 (cuda) or 2 (triton), got ", backend);
             p.feedback = feedback.has_value() ? *feedback : Tensor();
             p.rng = std::move(rng);
             p.backend = static_cast<ProductBackend>(backend);
             p.output_width = output_width;
             p.input_numel = input_numel;
             p.scale = scale;
             p.distribution = distribution;
             p.block_elements = block_elements;
             p.input_shape = std::move(input_shape);
             p.ready = true;
           },
           py::arg("feedback"), py::arg("rng"), py::arg("output_width"), py::arg("input_numel"), py::arg("scale"),
           py::arg("distribution"), py::arg("block_elements"), py::arg("input_shape"), py::arg("backend"));
  m.def("direct_feedback_join", &join, py::arg("output"), py::arg("input"), py::arg("pass"), py::arg("projection"),
        py::arg("missing_error"),
        "output with a new history: grad_output to output, reshape(e B_l, input's shape) to input");
  m.def("direct_feedback_capture", &capture_error, py::arg("output"), py::arg("pass"),
        "Stores output's gradient in pass.error when the backward reaches output");
}

} // namespace fastfa
