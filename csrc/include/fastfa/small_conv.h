// Direct CPU loops for a small conv2d layer's maps: the convolution, its weight gradient, its
// transposed convolution (grad_input), and the weight gradient against the convolution of the same
// input, for the estimated rules' B gradient (aten_backend.cpp's AlignmentMaps). On a small layer
// each ATen call costs ~4 us of dispatch, backend choice, im2col and allocations (fp32 at batch > 1,
// oneDNN: ~45 us) around a few hundred ns of arithmetic; these loops cost the arithmetic, an unfold
// (into a buffer kept per thread) and the output's allocation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastfa {

// Whether the direct loops serve this layer's maps: a CPU layer in fp64 / fp32 / fp16 / bf16
// whose convolution, input (N, C, H, W) and filter (C_out, C / groups, kh, kw) to an output of
// output_sizes, takes at most kSmallConvMaxMacs multiply-adds. Each of the three maps takes
// the same number of them (one bilinear form, contracted three ways), so one test serves all.
// What a map writes: scale * map + addend_scale * addend, summed in the dtype's opmath and rounded
// once, so that a rule's scale and sum with B, x or r cost no op of their own (feedback_gradient).
// addend: none (nullptr), or a tensor of the map's output shape and dtype, any layout.
struct Epilogue {
  double scale = 1.0;
  const at::Tensor* addend = nullptr;
  double addend_scale = 1.0;
};

bool small_conv2d_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef output_sizes,
                          int64_t groups);

// y = conv2d(input, filter) (then the epilogue): (N, C_out, H_out, W_out), input's dtype, contiguous.
at::Tensor small_conv2d(const at::Tensor& input, const at::Tensor& filter, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        const Epilogue& epilogue = {});

// The filter gradient of conv2d for grad_output and input (then the epilogue): (C_out, C / groups,
// kh, kw) of weight_sizes, input's dtype, contiguous.
at::Tensor small_conv2d_weight(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef weight_sizes, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, const Epilogue& epilogue = {});

// The filter gradient of conv2d for grad_output conv2d(input, filter) (then `projected`, whose addend
// has the convolution's output shape) and input (then the epilogue): filter's sizes, input's dtype,
// contiguous. The same values as small_conv2d then small_conv2d_weight, the input unfolded once for
// both and the convolution never stored (the alignment primitives' outer(project(x, M), x)).
at::Tensor small_conv2d_projection_outer(const at::Tensor& input, const at::Tensor& filter, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        const Epilogue& projected = {}, const Epilogue& epilogue = {});

// The transposed convolution of grad_output with filter (conv2d's grad_input; then the epilogue):
// (N, C, H, W) of input_sizes, grad_output's dtype, contiguous.
at::Tensor small_conv2d_input(const at::Tensor& grad_output, const at::Tensor& filter, at::IntArrayRef input_sizes,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const Epilogue& epilogue = {});

} // namespace fastfa
