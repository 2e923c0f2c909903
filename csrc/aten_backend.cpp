// The aten backend: fastfa's feedback transform (CPU or CUDA kernel), then the vendor
// GEMM / convolution through ATen (oneDNN / MKL on the CPU, cuBLAS / cuDNN on the GPU).
// Registered for both devices: only the transform differs between them.
#include "fastfa/feedback.h"
#include "fastfa/ops.h"
#include "fastfa/small_conv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/TensorUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace fastfa {

at::Tensor rms_scale(const at::Tensor& weight) {
  const auto opmath = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::linalg_vector_norm(weight, 2, std::nullopt, false, opmath)
      .div_(std::sqrt(static_cast<double>(std::max<int64_t>(weight.numel(), 1))));
}

namespace {

// B for grad_input. With deferred_scale (the caller's choice: where applying s to grad_input costs
// less than a second pass over B), *deferred_scale is the factor left to apply to grad_input: usf's
// rms scale on the CPU in fp32 / fp64, where B is then sign(W); else 1. Without it, B carries s.
at::Tensor feedback_for_backward(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                 const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                 int64_t distribution, double* deferred_scale = nullptr) {
  if (deferred_scale != nullptr) *deferred_scale = 1.0;
  const auto kind = static_cast<Rule>(rule);
  if (kind == Rule::kBackprop) {
    return weight; // no pass over W: backprop is exactly torch's own backward
  }
  if ((kind == Rule::kFeedbackAlignment || estimates_feedback(kind)) && feedback.has_value() && feedback->defined()) {
    // fa's stored R and the estimated rules' B are used as they are (the caller checked their
    // shape, dtype, device): the transform would only copy them, a W-sized pass every step.
    return *feedback;
  }
  if (weight.is_cpu()) {
    return feedback_for_backward_cpu(weight, feedback, rng, rule, scale, distribution, deferred_scale);
  }
  if (scale_from_weight(kind, scale)) {
    // sign(W) is exact in every dtype, so B = s * sign(W) still rounds once, at s.
    return feedback_for_backward(weight, feedback, rng, rule, 1.0, distribution).mul_(rms_scale(weight));
  }
  static const auto transform = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fastfa::feedback_transform", "")
                                    .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, int64_t, double,
                                                      int64_t)>();
  return transform.call(weight, feedback, rng, rule, scale, distribution);
}

// An output slot the call leaves unfilled (no pre-activation or projection kept, a gradient the mask
// did not ask for): 0 elements of like's dtype on like's device. On the CPU it is made without an op
// dispatch (new_empty dispatches new_empty, then empty): a small layer's step made three of them, six
// dispatches of host time for nothing. The kernels run on plain CPU tensors (fake and functional
// tensors take the ops' fake kernels), so skipping the dispatcher skips no mode.
at::Tensor empty_output(const at::Tensor& like) {
  if (like.is_cpu()) return at::detail::empty_cpu({0}, like.scalar_type());
  return like.new_empty({0});
}

enum class Activation { kNone, kRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid };

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  TORCH_CHECK(false, "fastfa: activation must be one of none, relu, gelu, gelu_tanh, silu, tanh, sigmoid; got '",
              name, "'");
}

// Applies the activation to the pre-activation z (in place: z is ours). Returns what
// the backward needs besides the output: z itself where the derivative needs it
// (gelu, silu), otherwise an empty tensor (relu, tanh, sigmoid differentiate from the
// output, which autograd saves anyway).
std::tuple<at::Tensor, at::Tensor> activation_forward(at::Tensor z, Activation activation) {
  switch (activation) {
  case Activation::kNone:
    return {z, empty_output(z)};
  case Activation::kRelu:
    return {z.relu_(), empty_output(z)};
  case Activation::kTanh:
    return {z.tanh_(), empty_output(z)};
  case Activation::kSigmoid:
    return {z.sigmoid_(), empty_output(z)};
  case Activation::kGelu:
    return {at::gelu(z), z};
  case Activation::kGeluTanh:
    return {at::gelu(z, "tanh"), z};
  case Activation::kSilu:
    return {at::silu(z), z};
  }
  return {z, empty_output(z)};
}

// delta = dL/dz from dL/dy; `saved` is the output (relu, tanh, sigmoid) or z (gelu, silu).
at::Tensor activation_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                               Activation activation) {
  switch (activation) {
  case Activation::kNone:
    return grad_output;
  case Activation::kRelu:
    return at::threshold_backward(grad_output, saved, 0);
  case Activation::kTanh:
    return at::tanh_backward(grad_output, saved);
  case Activation::kSigmoid:
    return at::sigmoid_backward(grad_output, saved);
  case Activation::kGelu:
    return at::gelu_backward(grad_output, saved);
  case Activation::kGeluTanh:
    return at::gelu_backward(grad_output, saved, "tanh");
  case Activation::kSilu:
    return at::silu_backward(grad_output, saved);
  }
  return grad_output;
}

void check_layer_arguments(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "fastfa: input and weight must share a dtype, got ",
              input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), "fastfa: input and weight must be on one device, got ",
              input.device(), " and ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastfa: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device(),
                "fastfa: bias must have weight's dtype and device");
  }
}

} // namespace

void check_linear_arguments(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "fastfa: linear weight must be 2-D (out_features, in_features), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1),
              "fastfa: input's last dimension must be in_features=", weight.size(1), ", got shape ",
              input.sizes());
  check_layer_arguments(input, weight, bias);
}

at::Tensor activation_delta(const at::Tensor& grad_output, const at::Tensor& activation_saved,
                            c10::string_view activation) {
  return activation_backward(grad_output, activation_saved, parse_activation(activation));
}

void check_conv2d_arguments(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t groups) {
  TORCH_CHECK(weight.dim() == 4, "fastfa: conv2d weight must be 4-D (out, in/groups, kh, kw), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.dim() == 4, "fastfa: conv2d input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0 && input.size(1) == weight.size(1) * groups,
              "fastfa: conv2d input must have in_channels=", weight.size(1) * groups, " (groups=", groups,
              "), got shape ", input.sizes());
  check_layer_arguments(input, weight, bias);
}

std::vector<int64_t> conv2d_output_shape(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastfa: stride, padding and dilation must have 2 values each");
  std::vector<int64_t> shape{input.size(0), weight.size(0), 0, 0};
  for (int axis = 0; axis < 2; ++axis) {
    shape[2 + axis] =
        (input.size(2 + axis) + 2 * padding[axis] - dilation[axis] * (weight.size(2 + axis) - 1) - 1) / stride[axis] +
        1;
  }
  return shape;
}

namespace {

at::Tensor empty_gradient(const at::Tensor& like) { return empty_output(like); }

// [alpha, beta, gamma, sigma], and on aten an optional fifth value: normalize_input (1 or 0), the
// fastfa.nn layers' default for aa and ia (fastfa.alignment.LAYER_DEFAULTS), whose B gradient is
// then the closed form with x normalised per sample (standardized_per_sample).
void check_alignment(at::ArrayRef<double> alignment) {
  TORCH_CHECK(alignment.size() == 4 || alignment.size() == 5,
              "fastfa: alignment must be [alpha, beta, gamma, sigma] (or, on aten, [alpha, beta, gamma, sigma, "
              "normalize_input]), got ", alignment.size(), " values");
}

bool normalizes_input(at::ArrayRef<double> alignment) { return alignment.size() == 5 && alignment[4] != 0.0; }

// c as a wrapped number for t's kernels. `t * double` in C++ goes through mul.Scalar, which copies
// c into a tensor with four more op dispatches (to, _to_copy, empty_strided, copy_); a wrapped
// number, as Python's `t * c` passes, is read as a scalar on any device. In t's dtype for fp32 /
// fp64 (a wrapped number of another dtype is cast with .to() first; the kernel would round c to t's
// dtype anyway); fp16 / bf16 keep a double, which their kernels read in fp32. Sums of scaled terms
// use add / sub's alpha instead.
at::Tensor wrapped_scalar(const at::Tensor& t, double c) {
  const auto dtype = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ? t.scalar_type() : at::kDouble;
  at::Tensor scalar = at::detail::scalar_tensor_static(c, dtype, at::kCPU);
  scalar.unsafeGetTensorImpl()->set_wrapped_number(true);
  return scalar;
}

// t * c, new.
at::Tensor scaled(const at::Tensor& t, double c) { return at::mul(t, wrapped_scalar(t, c)); }

// t *= c, in place (t is a new tensor of ours).
at::Tensor scale_(at::Tensor t, double c) { return t.mul_(wrapped_scalar(t, c)); }

// The epilogue (small_conv.h) applied to a map's new result t as ATen ops: today's scale and add.
at::Tensor with_epilogue(at::Tensor t, const Epilogue& epilogue) {
  if (epilogue.scale != 1.0) scale_(t, epilogue.scale);
  if (epilogue.addend != nullptr) t.add_(*epilogue.addend, epilogue.addend_scale);
  return t;
}

// One alignment map with its epilogue: scale * map(a, m) + addend_scale * addend. The direct
// small-conv loops write the epilogue in their last pass, with no op of its own; ATen's calls apply
// it as ops on their result (with_epilogue).
class Map {
 public:
  template <typename F> // a callable (a, m, epilogue) -> the result
  Map(F map) : map_(std::move(map)) {}

  at::Tensor operator()(const at::Tensor& a, const at::Tensor& m, const Epilogue& epilogue = {}) const {
    return map_(a, m, epilogue);
  }

 private:
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const Epilogue&)> map_;
};

// The alignment primitives of learning-rules.md for one layer kind: project(x, M) = x M^T
// (conv: conv2d(x, M)), outer(r, x) = r^T x (conv: conv2d_weight(x, W.shape, r)),
// back(r, M) = r M (conv: the transposed convolution of r with M); means over `batch`.
// `matrices`: a Linear layer's, where the primitives are plain matrix products, so that a scaled
// sum with a product folds into one addmm (a small layer's B gradient is mostly op dispatch).
struct AlignmentMaps {
  Map project, outer, back;
  int64_t batch;
  bool matrices = false;
  // outer(project(x, M) (then `projected`), x) (then the epilogue) in one call where the maps have
  // such a form (the small-conv loops: x unfolded once for both products, the projection never
  // stored); empty: the two maps.
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const Epilogue&, const Epilogue&)>
      fused_project_outer;

  at::Tensor project_outer(const at::Tensor& x, const at::Tensor& m, const Epilogue& projected = {},
                           const Epilogue& epilogue = {}) const {
    if (fused_project_outer) return fused_project_outer(x, m, projected, epilogue);
    return outer(project(x, m, projected), x, epilogue);
  }
};

// a x + b y, x and y of one shape (kp's and sa's B gradient, aa's combined filter: filter-sized). On
// a small dense CPU pair, one loop into one new tensor: there the ops' way, a scalar tensor, a mul,
// its intermediate and a sub (kp's: one add), costs dispatches against a pass of a few hundred
// elements. Up to kAxpbyLoopMaxElements, where the loop's pass (no threads, fp16 / bf16 converted
// element by element) is still small against one dispatch.
constexpr int64_t kAxpbyLoopMaxElements = 4096;

at::Tensor axpby(double a, const at::Tensor& x, double b, const at::Tensor& y) {
  const auto dtype = x.scalar_type();
  if (x.is_cpu() && y.is_cpu() && y.scalar_type() == dtype && x.sizes() == y.sizes() &&
      x.numel() <= kAxpbyLoopMaxElements && x.is_contiguous() && y.is_contiguous() &&
      (dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    at::Tensor out = at::detail::empty_cpu(x.sizes(), dtype, /*pin_memory=*/false, std::nullopt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastfa_axpby", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t ca = static_cast<acc_t>(a), cb = static_cast<acc_t>(b);
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      const scalar_t* ys = y.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0, n = x.numel(); i < n; ++i) {
        o[i] = static_cast<scalar_t>(ca * static_cast<acc_t>(xs[i]) + cb * static_cast<acc_t>(ys[i]));
      }
    });
    return out;
  }
  return at::add(a == 1.0 ? x : scaled(x, a), y, b); // kp's grad_W + 2 alpha B: one add
}

// sqrt(F) x_hat, x_hat being x centred and scaled to unit L2 norm per sample (x flattened to (N, F)),
// as the alignment pipeline's normalize_input (fastfa/alignment.py, _normalize): an all-zero sample
// stays zero. One layer_norm without affine over every dimension but the first: (x - mean) /
// sqrt(var + eps) with var = ||x - mean||^2 / F is sqrt(F) x_hat; eps, the smallest positive value of
// its accumulation dtype, makes an all-zero sample's quotient 0 / sqrt(eps) = 0 and moves any normal
// variance by one ulp at most. The 1 / sqrt(F) is left to the callers (feedback_gradient): every term
// that reads x_hat is bilinear in it, so 1 / F folds into its coefficient, one op fewer than a scale.
// Below kStandardizeMaxElements elements on the CPU the same formula runs as a direct loop
// (standardize_rows): there native_layer_norm's dispatch and its output, mean and rstd allocations
// cost more than the pass itself: ~1.5 us saved at 64 elements, even at ~1-2k, 5-7% slower at 4k
// (one thread, fp32 and fp64; benchmarks/results/2026-12-01-cpu-host-smallconv.md).
constexpr int64_t kStandardizeMaxElements = 2048;

template <typename scalar_t>
void standardize_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t width, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = 0; row < rows; ++row, x += width, out += width) {
    acc_t sum = 0;
    for (int64_t j = 0; j < width; ++j) sum += static_cast<acc_t>(x[j]);
    const acc_t mean = sum / static_cast<acc_t>(width);
    acc_t squares = 0;
    for (int64_t j = 0; j < width; ++j) {
      const acc_t centred = static_cast<acc_t>(x[j]) - mean;
      squares += centred * centred;
    }
    const acc_t rstd = acc_t(1) / std::sqrt(squares / static_cast<acc_t>(width) + static_cast<acc_t>(eps));
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<scalar_t>((static_cast<acc_t>(x[j]) - mean) * rstd);
  }
}

at::Tensor standardized_per_sample(const at::Tensor& x) {
  if (x.numel() == 0) {
    return x.clone(); // a new tensor either way: feedback_gradient may write into it
  }
  const double eps = x.scalar_type() == at::kDouble ? std::numeric_limits<double>::denorm_min()
                                                    : static_cast<double>(std::numeric_limits<float>::denorm_min());
  const auto dtype = x.scalar_type();
  if (x.is_cpu() && x.numel() <= kStandardizeMaxElements &&
      (dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    const at::Tensor dense = x.contiguous();
    at::Tensor out = at::detail::empty_cpu(x.sizes(), x.scalar_type(), /*pin_memory=*/false, std::nullopt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfa_standardize", [&] {
      standardize_rows<scalar_t>(dense.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(0),
                                 x.numel() / x.size(0), eps);
    });
    return out;
  }
  return std::get<0>(at::native_layer_norm(x, x.sizes().slice(1), std::nullopt, std::nullopt, eps));
}

// xi ~ N(0, sigma^2) shaped like x, from the same counter-based generator as brsf's draws
// (the fa-regeneration path of the transform, with x standing in for a weight of x's shape).
at::Tensor weight_mirror_noise(const at::Tensor& x, const std::optional<at::Tensor>& rng, double sigma) {
  const at::Tensor like = x.contiguous();
  if (like.is_cpu()) {
    return feedback_transform_cpu(like, std::nullopt, rng, static_cast<int64_t>(Rule::kFeedbackAlignment), sigma,
                                  static_cast<int64_t>(Distribution::kNormal));
  }
  static const auto transform = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fastfa::feedback_transform", "")
                                    .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, int64_t, double,
                                                      int64_t)>();
  return transform.call(like, std::nullopt, rng, static_cast<int64_t>(Rule::kFeedbackAlignment), sigma,
                        static_cast<int64_t>(Distribution::kNormal));
}

// B's gradient for the estimated rules (learning-rules.md, "Estimated feedback").
// B gets no task gradient, only the alignment terms (kp: W's task gradient). With normalize_input
// (aa, ia), x is normalised per sample and r is recomputed from it: the pipeline's loss with that
// one switch has the table's gradient in x_hat and r_hat = project(x_hat, W). Both rules' input
// terms are bilinear in x_hat (r_hat and p_hat are linear in it), so they are computed from
// z = sqrt(F) x_hat (standardized_per_sample) with 1 / F more in their coefficients, which already
// hold the batch mean's 1 / N: `batch` below is N F.
at::Tensor feedback_gradient(Rule rule, const at::Tensor& feedback, const at::Tensor& weight,
                             const at::Tensor& grad_weight, const at::Tensor& layer_input,
                             const at::Tensor& layer_projection, const std::optional<at::Tensor>& rng,
                             at::ArrayRef<double> alignment, const AlignmentMaps& maps) {
  const double alpha = alignment[0], beta = alignment[1], gamma = alignment[2], sigma = alignment[3];
  const bool normalize = normalizes_input(alignment) &&
                         (rule == Rule::kActivationAlignment || rule == Rule::kInformationAlignment);
  const int64_t width = normalize ? c10::multiply_integers(layer_input.sizes().slice(1)) : 1;
  const double batch = static_cast<double>(std::max<int64_t>(maps.batch, 1)) *
                       static_cast<double>(std::max<int64_t>(width, 1));
  const at::Tensor input = normalize ? standardized_per_sample(layer_input) : layer_input;
  // r_hat (as sqrt(F) r_hat) where aa's convolutions do not fold it away.
  const bool projects = normalize && (maps.matrices || rule == Rule::kInformationAlignment);
  const at::Tensor projection = projects ? maps.project(input, weight) : layer_projection;
  switch (rule) {
  case Rule::kKolenPollack: // grad_W + alpha * decay
    return axpby(1.0, grad_weight, 2.0 * alpha, feedback);
  case Rule::kSymmetricAlignment: // alpha * decay + beta * self
    return axpby(2.0 * alpha, feedback, -beta, weight);
  case Rule::kWeightMirror: { // alpha * decay + beta * amp, with x replaced by noise
    const at::Tensor noise = weight_mirror_noise(input, rng, sigma);
    if (maps.matrices) { // 2 alpha B - (beta / N) r^T noise
      return at::addmm(feedback, maps.project(noise, weight).t(), noise, 2.0 * alpha, -beta / batch);
    }
    return maps.project_outer(noise, weight, {}, {-beta / batch, &feedback, 2.0 * alpha});
  }
  case Rule::kActivationAlignment: { // alpha * sparse + beta * amp = (1/N) (2 alpha p - beta r)^T x
    if (maps.matrices) { // (2 alpha / N) x B^T - (beta / N) r in one addmm, into r_hat where it is ours
      const double a = 2.0 * alpha / batch, b = -beta / batch;
      return maps.outer(projects ? projection.addmm_(input, feedback.t(), b, a)
                                 : at::addmm(projection, input, feedback.t(), b, a),
                        input);
    }
    if (normalize) { // p and r_hat are linear in the filter: one convolution with (2 alpha / N) B - (beta / N) W
      const at::Tensor filter = axpby(2.0 * alpha / batch, feedback, -beta / batch, weight);
      return maps.project_outer(input, filter);
    }
    return maps.project_outer(input, feedback, {2.0 * alpha / batch, &projection, -beta / batch});
  }
  case Rule::kInformationAlignment: { // alpha * amp + beta * null + gamma * decay, linear in outer's x
    if (maps.matrices) { // r^T ((2 beta / N) r B - (alpha / N) x) + 2 gamma B in two addmm, the first
                         // into the normalised x where it is ours
      const double a = 2.0 * beta / batch, b = -alpha / batch;
      const at::Tensor inner = normalize ? input.addmm_(projection, feedback, b, a)
                                         : at::addmm(input, projection, feedback, b, a);
      return at::addmm(feedback, projection.t(), inner, 2.0 * gamma, 1.0);
    }
    return maps.outer(projection, maps.back(projection, feedback, {2.0 * beta / batch, &input, -alpha / batch}),
                      {1.0, &feedback, 2.0 * gamma});
  }
  default:
    TORCH_CHECK(false, "fastfa: rule ", static_cast<int64_t>(rule), " does not estimate its feedback");
  }
}

// B's gradient in B's own layout, whatever layout the primitives' ATen calls chose.
at::Tensor in_layout_of(const at::Tensor& gradient, const at::Tensor& like) {
  return gradient.contiguous(like.suggest_memory_format());
}

// aa and ia keep r = x W^T for B's gradient; with normalize_input the backward recomputes it from
// the normalised x instead, so the forward keeps nothing (and adds its bias in the product).
bool saves_projection(int64_t rule, at::ArrayRef<double> alignment) {
  const auto kind = static_cast<Rule>(rule);
  return (kind == Rule::kActivationAlignment || kind == Rule::kInformationAlignment) && !normalizes_input(alignment);
}

// z = r + b from r = x W^T (or conv2d(x, W)) without bias, so that r can be kept for the
// backward (aa, ia) at the cost of one add; z is a new tensor the activation may overwrite.
at::Tensor add_bias(const at::Tensor& projection, const std::optional<at::Tensor>& bias, int64_t channel_dim) {
  if (!bias.has_value() || !bias->defined()) {
    return projection.clone();
  }
  std::vector<int64_t> shape(projection.dim(), 1);
  shape[channel_dim] = bias->size(0);
  return projection + bias->view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> with_projection(std::tuple<at::Tensor, at::Tensor> outputs,
                                                               at::Tensor projection) {
  return {std::get<0>(outputs), std::get<1>(outputs), std::move(projection)};
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
  check_linear_arguments(input, weight, bias);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_alignment(alignment);
  const Activation kind = parse_activation(activation);
  if (saves_projection(rule, alignment)) {
    at::Tensor projection = at::linear(input, weight);
    return with_projection(activation_forward(add_bias(projection, bias, projection.dim() - 1), kind), projection);
  }
  return with_projection(activation_forward(at::linear(input, weight, bias), kind), empty_output(input));
}

namespace {

// t.reshape(sizes) without its op dispatches (reshape, then _reshape_alias or view) where that
// alias would be t itself: the same sizes, and the same strides (reshape recomputes those of size-1
// dimensions, which may differ from t's, as in a batch of one row). A 2-D input and its grad_output
// then reach the GEMMs as they are, bit for bit what the reshaped aliases were.
at::Tensor reshaped(const at::Tensor& t, at::IntArrayRef sizes) {
  if (t.sizes() == sizes) {
    const auto strides = at::detail::computeStride(t.sizes(), t.strides(), at::DimVector(sizes));
    if (strides.has_value() && at::IntArrayRef(*strides) == t.strides()) return t;
  }
  return t.reshape(sizes);
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_linear_arguments(input, weight, std::nullopt);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_alignment(alignment);
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t rows = in_features > 0 ? input.numel() / in_features
                                       : c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  TORCH_CHECK(grad_output.numel() == rows * out_features, "fastfa: grad_output must have ", rows * out_features,
              " elements (", rows, " rows of ", out_features, "), got shape ", grad_output.sizes());
  const auto kind = static_cast<Rule>(rule);
  const bool feedback_grad = output_mask[3] && estimates_feedback(kind);
  // Leading dimensions fold into one batch of rows: y = x W^T + b, delta = dL/dz.
  const at::Tensor delta =
      reshaped(activation_backward(grad_output, activation_saved, parse_activation(activation)), {rows, out_features});
  const at::Tensor x = reshaped(input, {rows, in_features});
  at::Tensor grad_input, grad_weight, grad_bias, grad_feedback;
  if (output_mask[0]) {
    // grad_x = delta B: the only place the rule enters the task gradients. usf's deferred s is the
    // GEMM's alpha: no pass over B and no extra op, which on a tiny layer costs more than the GEMM.
    // addmm_out into an uninitialised result with beta 0 never reads it (at::mm itself is that call
    // on the CPU); a result of the final shape, allocated without a dispatch, needs no expand.
    double deferred_scale = 1.0;
    const at::Tensor b = feedback_for_backward(weight, feedback, rng, rule, scale, distribution, &deferred_scale);
    if (deferred_scale == 1.0) {
      grad_input = at::mm(delta, b);
    } else {
      grad_input = at::detail::empty_cpu({rows, in_features}, delta.scalar_type());
      at::addmm_out(grad_input, grad_input, delta, b, /*beta=*/0.0, /*alpha=*/deferred_scale);
    }
    // A 2-D input has the result's shape already; viewing it would only cost a dispatch.
    if (input.dim() != 2) grad_input = grad_input.view(input.sizes());
  }
  if (output_mask[1] || (feedback_grad && kind == Rule::kKolenPollack)) {
    grad_weight = at::mm(delta.t(), x); // delta^T x, every rule
  }
  if (output_mask[2]) {
    grad_bias = delta.sum(0);
  }
  if (feedback_grad) {
    const AlignmentMaps maps{
        [](const at::Tensor& a, const at::Tensor& m, const Epilogue& e) { return with_epilogue(at::mm(a, m.t()), e); },
        [](const at::Tensor& r, const at::Tensor& a, const Epilogue& e) { return with_epilogue(at::mm(r.t(), a), e); },
        [](const at::Tensor& r, const at::Tensor& m, const Epilogue& e) { return with_epilogue(at::mm(r, m), e); },
        rows, /*matrices=*/true};
    const at::Tensor r = projection.numel() > 0 ? projection.reshape({rows, out_features}) : projection;
    grad_feedback =
        in_layout_of(feedback_gradient(kind, *feedback, weight, grad_weight, x, r, rng, alignment, maps), *feedback);
  }
  return {output_mask[0] ? grad_input : empty_gradient(input),
          output_mask[1] ? grad_weight : empty_gradient(weight),
          output_mask[2] ? grad_bias : empty_gradient(weight),
          feedback_grad ? grad_feedback : empty_gradient(weight)};
}

namespace {

// torch 2.14.1's CPU bf16 convolution (oneDNN) goes wrong in geometries nobody has mapped fully:
// where the input is narrower than the dilated kernel along an axis, so that only the padding
// makes it fit, convolution_backward returns a wrong grad_weight (up to 1e37; a (12, 1, 2, 3)
// filter, groups 3, stride (3, 2), padding (0, 1) over a 3x3x6x1 input), in none to all of the
// calls depending on what the process freed before (it reads memory it never wrote), and some
// forwards crash (a (4, 3, 2, 2) filter, stride (3, 1), padding (1, 2), dilation 2 over a 3x3x1x4
// input); ordinary geometries with one output column are wrong too (a (1, 1, 1, 2) filter, stride
// (1, 3), padding (0, 1) over a 1x1x2x2 input; a 1x1x6x5 input, (1, 1, 2, 3) filter, stride (1, 2),
// dilation (1, 2)). fp32 is right in all of them, so every CPU bf16 convolution runs in fp32 and is
// rounded to bf16 at the end, as oneDNN's bf16 kernels do; the GPU and other dtypes are untouched.
bool widens_to_fp32(const at::Tensor& input) {
  return input.is_cpu() && input.scalar_type() == at::kBFloat16;
}

// fp32 copies in, the input's dtype out, when `widen` (widens_to_fp32).
struct Widening {
  bool widen;
  at::ScalarType dtype;

  at::Tensor in(const at::Tensor& t) const { return widen && t.defined() ? t.to(at::kFloat) : t; }
  std::optional<at::Tensor> in(const std::optional<at::Tensor>& t) const {
    return t.has_value() ? std::optional<at::Tensor>(in(*t)) : std::nullopt;
  }
  at::Tensor out(const at::Tensor& t) const { return widen && t.defined() ? t.to(dtype) : t; }
};

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation) {
  check_conv2d_arguments(input, weight, bias, groups);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_alignment(alignment);
  const Activation kind = parse_activation(activation);
  const Widening fp32{widens_to_fp32(input), input.scalar_type()};
  if (saves_projection(rule, alignment)) {
    at::Tensor projection = fp32.out(at::convolution(fp32.in(input), fp32.in(weight), std::nullopt, stride, padding,
                                                     dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                                     groups));
    return with_projection(activation_forward(add_bias(projection, bias, 1), kind), projection);
  }
  return with_projection(
      activation_forward(fp32.out(at::convolution(fp32.in(input), fp32.in(weight), fp32.in(bias), stride, padding,
                                                  dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups)),
                         kind),
      empty_output(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_conv2d_arguments(input, weight, std::nullopt, groups);
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_alignment(alignment);
  const std::vector<int64_t> expected = conv2d_output_shape(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "fastfa: grad_output must have the output's shape ",
              at::IntArrayRef(expected), ", got ", grad_output.sizes());
  const auto kind = static_cast<Rule>(rule);
  const bool feedback_grad = output_mask[3] && estimates_feedback(kind);
  const at::Tensor delta = activation_backward(grad_output, activation_saved, parse_activation(activation));
  // grad_x is the transposed convolution of delta with B, and grad_W does not read the
  // filter's values, only its shape: one convolution_backward call with B in W's place
  // gives both, on the same oneDNN / cuDNN kernels backprop uses.
  // A convolution has no alpha: usf's s goes on grad_input (one more op) only where grad_input is
  // smaller than W by more than what that op's dispatch costs (kDeferMin elements of a pass in
  // cache, about 2 us); else B *= s in the transform's pass, B still in cache.
  constexpr int64_t kDeferMin = 16384;
  double deferred_scale = 1.0;
  const bool defer = input.numel() + kDeferMin < weight.numel();
  // usf with few output positions against a large filter: grad_input from W's signs read in place
  // (csrc/cpu/sign_conv_grad_input.cpp), no B, and oneDNN only for grad_weight / grad_bias.
  const bool signs_in_place = output_mask[0] && sign_conv_grad_input_applies(delta, input, weight, groups, rule);
  const at::Tensor filter = output_mask[0] && !signs_in_place
                                ? feedback_for_backward(weight, feedback, rng, rule, scale, distribution,
                                                        defer ? &deferred_scale : nullptr)
                                : weight;
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  const std::array<bool, 3> mask{output_mask[0] && !signs_in_place,
                                 output_mask[1] || (feedback_grad && kind == Rule::kKolenPollack), output_mask[2]};
  const Widening fp32{widens_to_fp32(input), input.scalar_type()};
  at::Tensor grad_input, grad_weight, grad_bias;
  if (mask[0] || mask[1] || mask[2]) {
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        fp32.in(delta), fp32.in(input), fp32.in(filter), mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups, mask);
  }
  if (signs_in_place) {
    grad_input = sign_conv_grad_input_cpu(delta, weight, input.sizes(), stride, padding, dilation, scale);
  }
  if (deferred_scale != 1.0) scale_(grad_input, deferred_scale);
  grad_input = fp32.out(grad_input);
  grad_weight = fp32.out(grad_weight);
  grad_bias = fp32.out(grad_bias);
  at::Tensor grad_feedback;
  if (feedback_grad) {
    // A small layer's maps run as direct loops (small_conv.h): there an ATen call's overhead is
    // most of its cost. Every map of the B gradient has the layer's geometry, so one test holds
    // for all of them. The loops read bf16 and sum in fp32, as the widened ATen path does.
    const bool direct = small_conv2d_applies(input, weight, expected, groups);
    // The loops write the rules' epilogue themselves; ATen's calls get it as ops after them.
    const auto convolve = [&](const at::Tensor& x, const at::Tensor& m, const Epilogue& epilogue) {
      if (direct) return small_conv2d(x, m, stride, padding, dilation, groups, epilogue);
      return with_epilogue(
          fp32.out(at::convolution(fp32.in(x), fp32.in(m), std::nullopt, stride, padding, dilation, false, {0, 0},
                                   groups)),
          epilogue);
    };
    // One of convolution_backward's two products, with the epilogue as ops: the input's gradient
    // (the transposed convolution of r with m) or the filter's (r against x).
    const auto aten_backward = [&](const at::Tensor& r, const at::Tensor& x, const at::Tensor& m, bool of_input,
                                   const Epilogue& epilogue) {
      const auto grads = at::convolution_backward(fp32.in(r), fp32.in(x), fp32.in(m), std::nullopt, stride, padding,
                                                  dilation, false, {0, 0}, groups, {of_input, !of_input, false});
      return with_epilogue(fp32.out(of_input ? std::get<0>(grads) : std::get<1>(grads)), epilogue);
    };
    const auto filter_gradient = [&](const at::Tensor& r, const at::Tensor& x, const Epilogue& epilogue) {
      if (direct) return small_conv2d_weight(r, x, weight.sizes(), stride, padding, dilation, groups, epilogue);
      return aten_backward(r, x, weight, /*of_input=*/false, epilogue);
    };
    const auto transposed = [&](const at::Tensor& r, const at::Tensor& m, const Epilogue& epilogue) {
      if (direct) return small_conv2d_input(r, m, input.sizes(), stride, padding, dilation, groups, epilogue);
      return aten_backward(r, input, m, /*of_input=*/true, epilogue);
    };
    AlignmentMaps maps{convolve, filter_gradient, transposed, input.size(0)};
    if (direct) {
      maps.fused_project_outer = [&](const at::Tensor& x, const at::Tensor& m, const Epilogue& projected,
                                     const Epilogue& epilogue) {
        return small_conv2d_projection_outer(x, m, stride, padding, dilation, groups, projected, epilogue);
      };
    }
    grad_feedback = in_layout_of(
        feedback_gradient(kind, *feedback, weight, grad_weight, input, projection, rng, alignment, maps), *feedback);
  }
  return {output_mask[0] ? grad_input : empty_gradient(input),
          output_mask[1] ? grad_weight : empty_gradient(weight),
          output_mask[2] ? grad_bias : empty_gradient(weight),
          feedback_grad ? grad_feedback : empty_gradient(weight)};
}

} // namespace fastfa
