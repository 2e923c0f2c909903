// Declarations of fastfa's kernels and of the aten backend's composite ops.
// The schemas are declared once, in pybind_src/ops_registration.cpp; python/fastfa/ops.py
// adds their fake (shape) kernels and autograd.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>
#include <vector>

namespace fastfa {

// Checks shared by the kernels: the message names the argument and what was expected.
void check_feedback_arguments(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                              const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                              int64_t distribution);

// B = T(W) for one rule, as a new tensor with W's shape, dtype, device and layout.
// rng is an int64 tensor [seed, step] on any device; it is read on the device
// that runs the kernel, so a CUDA step counter costs no host synchronisation.
at::Tensor feedback_transform_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                  const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                  int64_t distribution);
// The same B for the aten backend's own backward on the CPU, written into a per-thread
// buffer kept between steps: valid until the next call on this thread.
// With deferred_scale (the caller's choice, where scaling B's product costs less than a pass
// over B), usf's rms-scaled B in fp32 or fp64 comes back as sign(W) and *deferred_scale = s, for
// the caller to scale B's product instead (grad_input, rounded once more: within the
// tolerances); otherwise *deferred_scale = 1.
at::Tensor feedback_for_backward_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                     const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                     int64_t distribution, double* deferred_scale = nullptr);
// usf's grad_input of a weight-bound convolution (few output positions against a large filter),
// with sign(W) read in place, never written: where sign_conv_grad_input_applies (groups 1, fp32 /
// fp64, NCHW-contiguous W, M = N * Ho * Wo small against W; the thresholds are measured), the
// aten backend's conv2d_backward calls it in place of B = T(W) and oneDNN's backward-data.
// scale is usf's (kRmsScale: s from W, summed in the same pass).
bool sign_conv_grad_input_applies(const at::Tensor& delta, const at::Tensor& input, const at::Tensor& weight,
                                  int64_t groups, int64_t rule);
at::Tensor sign_conv_grad_input_cpu(const at::Tensor& delta, const at::Tensor& weight, at::IntArrayRef input_sizes,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    double scale);
// dfa's B_l (K x F), columns [column_begin, column_begin + column_count) of it: element (k, f)
// is scale * xi from fa's generator at (seed, step, k * F + f). rng is the layer's [seed, step].
at::Tensor direct_feedback_cpu(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                               int64_t column_count, double scale, int64_t distribution, at::ScalarType dtype);
// dfa's grad_x = e B_l: error (rows x K) times B_l (K x columns), B_l drawn a block of at most
// block_elements at a time on error's device, then ATen's GEMM (csrc/direct_feedback.cpp).
at::Tensor direct_feedback_product(const at::Tensor& error, const at::Tensor& rng, int64_t columns, double scale,
                                   int64_t distribution, int64_t block_elements);
void check_direct_feedback_product_arguments(const at::Tensor& error, const at::Tensor& rng, int64_t columns,
                                             double scale, int64_t distribution);
void check_direct_feedback_draw_arguments(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                                          int64_t column_count, double scale, int64_t distribution,
                                          at::ScalarType dtype);
#ifdef FASTFA_WITH_CUDA
// direct_feedback_cpu's block of B_l, drawn on rng's CUDA device (csrc/cuda/direct_feedback_cuda.cu).
at::Tensor direct_feedback_cuda(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                                int64_t column_count, double scale, int64_t distribution, at::ScalarType dtype);
at::Tensor feedback_transform_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                   const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                   int64_t distribution);
#endif

// usf's "rms" scale ||W|| / sqrt(numel(W)) as a 0-dim tensor on W's device (fp64 for an fp64 W,
// fp32 otherwise): computed there, so reading it costs no host synchronisation.
at::Tensor rms_scale(const at::Tensor& weight);

// Pieces of the aten backend that the cuda backend reuses: the linear ops' argument checks
// (the message names the argument) and delta = dL/dz from dL/dy and the saved activation.
void check_linear_arguments(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias);
at::Tensor activation_delta(const at::Tensor& grad_output, const at::Tensor& activation_saved,
                            c10::string_view activation);
// The conv2d ops' argument checks, and the output's (N, C, H, W) for stride, padding, dilation.
void check_conv2d_arguments(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t groups);
std::vector<int64_t> conv2d_output_shape(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation);

// The aten backend: fastfa's transform, then ATen's GEMM / convolution. The forward ops
// return (output, activation_saved, projection): projection is r = x W^T without bias
// for the rules whose B gradient needs it (aa, ia), else empty. The backward ops return
// (grad_input, grad_weight, grad_bias, grad_feedback); alignment is [alpha, beta, gamma, sigma]
// (aten: optionally a fifth value, normalize_input, for aa and ia).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask);

#ifdef FASTFA_WITH_FUSED_CUDA
// The cuda backend (csrc/cuda/linear_cuda.cu): the linear ops on fastfa's fused tensor-core
// GEMMs, with the aten ops' signatures and outputs; calls the fused kernels do not cover
// (fp64, fp32 without tf32, GPUs below sm_80) take the aten path with a warning.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_linear_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask);

// The cuda backend's conv2d (csrc/cuda/conv_cuda.cu): implicit GEMMs on the same kernels;
// what they do not cover (groups > 1, strided grad_input, the linear ops' reasons) takes the
// aten path (cuDNN, with the CUDA transform kernel) with a warning.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& feedback, const std::optional<at::Tensor>& rng,
    const at::Tensor& activation_saved, const at::Tensor& projection, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rule, double scale,
    int64_t distribution, at::ArrayRef<double> alignment, c10::string_view activation,
    std::array<bool, 4> output_mask);

// The cuda backend's dfa grad_x = e B_l: drawn fa's fused GEMM, B_l's tiles drawn inside it and
// never stored; direct_feedback_product's signature, and its path (recorded) where the fused
// kernels do not apply.
at::Tensor cuda_direct_feedback_product(const at::Tensor& error, const at::Tensor& rng, int64_t columns,
                                        double scale, int64_t distribution, int64_t block_elements);
#endif

} // namespace fastfa
