// The op schemas, declared once, and the CPU / CUDA kernels behind them.
// python/fastfa/ops.py adds the fake (shape) kernels and the autograd formulas.
//
// Every op takes the feedback description in the same trailing arguments:
//   feedback      the stored R (fa, frsf) or None
//   rng           int64 [seed, step] for the rules that draw (brsf; fa without stored R)
//   rule          fastfa::Rule id (python/fastfa/rules.py)
//   scale         s of usf, the draw's scale for brsf / drawn fa
//   distribution  0 uniform, 1 normal (the unit draw of R)
//   alignment     [alpha, beta, gamma, sigma] of the estimated rules (kp, wm, sa, aa, ia)
// Forward ops return (output, activation_saved, projection r = x W^T for aa / ia);
// backward ops (grad_input, grad_weight, grad_bias, grad_feedback), masked ones empty.
#include "fastfa/ops.h"

#include <torch/library.h>

TORCH_LIBRARY(fastfa, m) {
  m.def("feedback_transform(Tensor weight, Tensor? feedback, Tensor? rng, int rule, float scale, "
        "int distribution) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, Tensor? feedback, Tensor? rng, int rule, "
        "float scale, int distribution, float[] alignment, str activation) -> (Tensor, Tensor, Tensor)");
  m.def("linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? feedback, "
        "Tensor? rng, Tensor activation_saved, Tensor projection, int rule, float scale, int distribution, "
        "float[] alignment, str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? feedback, Tensor? rng, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, int rule, float scale, "
        "int distribution, float[] alignment, str activation) -> (Tensor, Tensor, Tensor)");
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? feedback, "
        "Tensor? rng, Tensor activation_saved, Tensor projection, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, int rule, float scale, int distribution, float[] alignment, "
        "str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
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

TORCH_LIBRARY_IMPL(fastfa, CPU, m) { register_kernels(m, &fastfa::feedback_transform_cpu); }

#ifdef FASTFA_WITH_CUDA
TORCH_LIBRARY_IMPL(fastfa, CUDA, m) { register_kernels(m, &fastfa::feedback_transform_cuda); }
#endif
