// The op schemas, declared once, and the CPU / CUDA kernels behind them.
// python/fastfa/ops.py adds the fake (shape) kernels; csrc/autograd.cpp their autograd.
//
// Every op takes the feedback description in the same trailing arguments:
//   feedback      the stored R (fa, frsf) or None
//   rng           int64 [seed, step] for the rules that draw (brsf; fa without stored R)
//   rule          fastfa::Rule id (python/fastfa/rules.py)
//   scale         s of usf, the draw's scale for brsf / drawn fa
//   distribution  0 uniform, 1 normal (the unit draw of R)
//   alignment     [alpha, beta, gamma, sigma] of the estimated rules (kp, wm, sa, aa, ia); aten also takes
//                 a fifth value, normalize_input (aa, ia: fastfa.nn's default, alignment.op_alignment)
// Forward ops return (output, activation_saved, projection r = x W^T for aa / ia);
// backward ops (grad_input, grad_weight, grad_bias, grad_feedback), masked ones empty.
#include "fastfa/ops.h"

#include <torch/library.h>

namespace {

// The layer ops' argument lists, shared by the aten ops and the cuda backend's twins
// (cuda_linear, ...), so every backend's op has exactly the same schema.
constexpr const char* kLinearSchema =
    "(Tensor input, Tensor weight, Tensor? bias, Tensor? feedback, Tensor? rng, int rule, "
    "float scale, int distribution, float[] alignment, str activation) -> (Tensor, Tensor, Tensor)";
constexpr const char* kLinearBackwardSchema =
    "(Tensor grad_output, Tensor input, Tensor weight, Tensor? feedback, "
    "Tensor? rng, Tensor activation_saved, Tensor projection, int rule, float scale, int distribution, "
    "float[] alignment, str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)";
constexpr const char* kConv2dSchema =
    "(Tensor input, Tensor weight, Tensor? bias, Tensor? feedback, Tensor? rng, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, int rule, float scale, "
    "int distribution, float[] alignment, str activation) -> (Tensor, Tensor, Tensor)";
constexpr const char* kConv2dBackwardSchema =
    "(Tensor grad_output, Tensor input, Tensor weight, Tensor? feedback, "
    "Tensor? rng, Tensor activation_saved, Tensor projection, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int rule, float scale, int distribution, float[] alignment, "
    "str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)";

void define_layer_ops(torch::Library& m, const std::string& prefix) {
  m.def((prefix + "linear" + kLinearSchema).c_str());
  m.def((prefix + "linear_backward" + kLinearBackwardSchema).c_str());
  m.def((prefix + "conv2d" + kConv2dSchema).c_str());
  m.def((prefix + "conv2d_backward" + kConv2dBackwardSchema).c_str());
}

} // namespace

TORCH_LIBRARY(fastfa, m) {
  m.def("feedback_transform(Tensor weight, Tensor? feedback, Tensor? rng, int rule, float scale, "
        "int distribution) -> Tensor");
  // dfa's B_l (K x F), a block of its columns, drawn from the layer's [seed, step] (rng).
  m.def("direct_feedback(Tensor rng, int rows, int columns, int column_begin, int column_count, float scale, "
        "int distribution, ScalarType dtype) -> Tensor");
  // dfa's grad_x = e B_l (rows x columns) with B_l drawn, never stored whole: the aten backend's
  // blocked product, and the cuda backend's fused one (B_l's tiles drawn inside the GEMM).
  constexpr const char* kDirectFeedbackProductSchema =
      "(Tensor error, Tensor rng, int columns, float scale, int distribution, int block_elements) -> Tensor";
  m.def((std::string("direct_feedback_product") + kDirectFeedbackProductSchema).c_str());
  m.def((std::string("cuda_direct_feedback_product") + kDirectFeedbackProductSchema).c_str());
  define_layer_ops(m, "");
  // Defined in every build so that Python can register their fakes and autograd; they have
  // CUDA kernels only where the fused kernels were compiled (fastfa.backends() says why not).
  define_layer_ops(m, "cuda_");
}

namespace {

// The aten backend's composite ops are the same functions on both devices (ATen picks
// oneDNN / MKL or cuBLAS / cuDNN); only the transform kernel differs.
template <typename Transform>
void register_kernels(torch::Library& m, Transform transform) {
  m.impl("feedback_transform", transform);
  m.impl("linear", &fastfa::linear_forward);
  m.impl("linear_backward", &fastfa::linear_backward);
  m.impl("conv2d", &fastfa::conv2d_forward);
  m.impl("conv2d_backward", &fastfa::conv2d_backward);
}

} // namespace

TORCH_LIBRARY_IMPL(fastfa, CPU, m) {
  register_kernels(m, &fastfa::feedback_transform_cpu);
  m.impl("direct_feedback", &fastfa::direct_feedback_cpu);
  m.impl("direct_feedback_product", &fastfa::direct_feedback_product);
}

#ifdef FASTFA_WITH_CUDA
TORCH_LIBRARY_IMPL(fastfa, CUDA, m) {
  register_kernels(m, &fastfa::feedback_transform_cuda);
  m.impl("direct_feedback", &fastfa::direct_feedback_cuda);
  m.impl("direct_feedback_product", &fastfa::direct_feedback_product);
}
#endif

#ifdef FASTFA_WITH_FUSED_CUDA
// The cuda backend: linear on fastfa's fused tensor-core GEMMs, conv2d as implicit GEMMs on
// the same kernels.
TORCH_LIBRARY_IMPL(fastfa, CUDA, m) {
  m.impl("cuda_linear", &fastfa::cuda_linear_forward);
  m.impl("cuda_linear_backward", &fastfa::cuda_linear_backward);
  m.impl("cuda_conv2d", &fastfa::cuda_conv2d_forward);
  m.impl("cuda_conv2d_backward", &fastfa::cuda_conv2d_backward);
  m.impl("cuda_direct_feedback_product", &fastfa::cuda_direct_feedback_product);
}
#endif
