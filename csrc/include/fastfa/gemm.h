// The cuda backend's fused GEMM: C = A B^T on the tensor cores, with the rule's feedback
// transform applied to B's tiles between the global load and the MMA, and the layer's
// bias / activation in the epilogue. Host-side declarations only (no ATen), so the
// instantiation files (csrc/cuda/gemm_*.cu) compile quickly and in parallel; the
// template itself is csrc/cuda/gemm_kernel.cuh, the ops that call it csrc/cuda/linear_cuda.cu.
#pragma once

#include "fastfa/feedback.h"

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastfa {
namespace gemm {

// Element types of the operands. Tf32 operands are stored as float and rounded to tf32
// when a tile is written to shared memory (used only where torch allows tf32).
struct Bf16 {};
struct Fp16 {};
struct Tf32 {};

// Which tensor-core path a kernel uses: mma.sync (sm_80 and later) or wgmma (sm_90a only).
enum class Arch { kSm80, kSm90a };

// One GEMM operand, logically rows x K: element (row, k) sits at
// data[row * row_stride + k * k_stride], and one of the two strides is 1.
struct Operand {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t k_stride = 1;
};

// C (m x n, row stride ldc) = A (m x k) B^T (B given as n x k).
struct Problem {
  int64_t m = 0, n = 0, k = 0;
  Operand a, b;
  void* c = nullptr;
  int64_t ldc = 0;
  // When set: A's row sums (grad_bias = sum of delta over the batch), written with C's dtype.
  void* a_row_sums = nullptr;
};

// The rule's transform of B's tiles. B's element offsets (row * row_stride + k * k_stride)
// are W's row-major indices, which key the counter-based draws (feedback.h), so a kernel
// draws exactly what the other backends draw.
struct FeedbackArgs {
  const void* stored = nullptr; // R of frsf (same strides as B)
  const int64_t* rng = nullptr; // [seed, step] on the device (brsf; fa without stored R)
  float scale = 1.0f;           // draws are uniform (Distribution::kUniform) inside the kernels
  // usf's "rms" scale on the device (else null): the transform is sign(W) and grad_input's
  // epilogue multiplies by s, once per output element (grad_x = s * (delta sign(W))).
  const float* output_scale = nullptr;
};

// The layer's activation, applied in the forward epilogue (aten_backend.cpp's names).
enum class Activation : int { kNone, kRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid };

// The linear forward's epilogue: z = acc + bias, output = activation(z); optionally the
// pre-activation z (gelu, silu differentiate from it) and the projection r = acc (aa, ia).
struct LinearEpilogueArgs {
  const void* bias = nullptr;
  void* saved = nullptr;
  void* projection = nullptr;
  Activation activation = Activation::kNone;
};

// y = act(x W^T + b): B is W unchanged.
template <typename Element>
cudaError_t linear_forward_gemm(Arch arch, const Problem& problem, const LinearEpilogueArgs& epilogue,
                                cudaStream_t stream);

// C = A B^T split over K into slices of k_tiles_per_split tiles: slice s writes its C to
// partial[s] (m x n) and A's row sums to partial_row_sums[s] (m), in fp32; the caller adds
// the slices (problem.c and problem.a_row_sums are not used). For a long K (grad_weight of a
// large batch), where the m x n tiles alone would leave SMs idle.
template <typename Element>
cudaError_t split_gemm(Arch arch, const Problem& problem, float* partial, float* partial_row_sums,
                       int64_t k_tiles_per_split, cudaStream_t stream);

// C = A T(B)^T with the transform of `rule` applied to B's tiles (kBackprop: B as it is,
// also for a stored fa R or an estimated B, which the caller passes as B itself).
template <typename Element>
cudaError_t feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                          cudaStream_t stream);

// feedback_gemm split over K into slices of k_tiles_per_split tiles, as split_gemm: slice s
// writes its C (times feedback.output_scale, where set) to partial[s] (m x n) in fp32, and the
// caller adds the slices. For grad_input with few rows, whose m x n tiles leave SMs idle.
template <typename Element>
cudaError_t split_feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                                float* partial, int64_t k_tiles_per_split, cudaStream_t stream);

// ---- Convolutions as implicit GEMMs (csrc/cuda/implicit_gemm.cuh) -----------------------
//
// A convolution with groups = 1. The filter's taps are ordered (c, kh, kw), or (kh, kw, c)
// when channels_last (then channels are the contiguous direction of every operand, and
// 16-byte vectors run along them). Activations are addressed through their element strides
// in (N, C, H, W) order, so any layout is read correctly; every element a kernel touches
// must lie within 2^31 elements of its tensor's base (offsets are 32-bit).
struct ConvShape {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, kernel_h = 0, kernel_w = 0, out_h = 0, out_w = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  bool channels_last = false;
};

struct ImageStrides {
  int64_t n = 0, c = 0, h = 0, w = 0;
};

// K elements per tile (128 bytes of each row): what a split-K slice is counted in.
inline int64_t tile_k(int64_t element_bytes) { return 128 / element_bytes; }

// y = act(conv(x, W) + b): rows = output pixels, columns = output channels; W is the
// out_channels x K matrix in the shape's tap order (a contiguous filter of that layout).
template <typename Element>
cudaError_t conv_forward_gemm(Arch arch, const ConvShape& shape, const void* x, const ImageStrides& x_strides,
                              const void* weight, void* y, const ImageStrides& y_strides,
                              const LinearEpilogueArgs& epilogue, cudaStream_t stream);

// grad_x = the transposed convolution of delta with T(W): rows = input pixels, columns =
// input channels, K = (out channel, kh, kw) in the shape's order; the rule's transform
// applied to W's elements (keyed by their logical (oc, c, kh, kw) index) as they load.
// W (or the stored R / B passed in W's place with kBackprop) is read through its strides.
template <typename Element>
cudaError_t conv_grad_input_gemm(Arch arch, Rule rule, const ConvShape& shape, const void* delta,
                                 const ImageStrides& delta_strides, const void* weight,
                                 const ImageStrides& weight_strides, const FeedbackArgs& feedback, void* grad_x,
                                 const ImageStrides& grad_x_strides, cudaStream_t stream);

// grad_W = delta^T im2col(x) and grad_b = the sums of delta, split over K = output pixels:
// slice s of k_tiles_per_split tiles writes partial[s] (out_channels x K in the shape's tap
// order) and partial_row_sums[s] (out_channels), in fp32; the caller adds the slices.
template <typename Element>
cudaError_t conv_grad_weight_gemm(Arch arch, const ConvShape& shape, const void* delta,
                                  const ImageStrides& delta_strides, const void* x, const ImageStrides& x_strides,
                                  float* partial, float* partial_row_sums, int64_t k_tiles_per_split,
                                  cudaStream_t stream);

// dfa's grad_x = e B_l (learning-rules.md, "Direct feedback alignment") as drawn fa's
// feedback_gemm: C (rows x F) = e (rows x K) B_l, B_l (K x F) the "weight" whose row-major
// index k * F + f keys the Philox draw, read as B[f][k] (row stride 1, k stride F), exactly as
// linear's grad_input reads W. Drawn fa reads nothing of B (RuleTransform's kReadsWeight is
// false): B_l is made tile by tile in the loader and never exists in memory, so b.data stays
// null. error is contiguous rows x K; grad_input contiguous rows x F.
inline Problem direct_feedback_problem(int64_t rows, int64_t output_width, int64_t input_numel, const void* error,
                                       void* grad_input) {
  Problem problem;
  problem.m = rows;
  problem.n = input_numel;
  problem.k = output_width;
  problem.a = {error, output_width, 1};
  problem.b = {nullptr, 1, input_numel};
  problem.c = grad_input;
  problem.ldc = input_numel;
  return problem;
}

// The transforms feedback_gemm has a kernel for.
inline bool has_feedback_kernel(Rule rule) {
  return rule == Rule::kBackprop || rule == Rule::kFeedbackAlignment || rule == Rule::kUniformSignSymmetry ||
         rule == Rule::kBatchRandomSignFeedback || rule == Rule::kFixedRandomSignFeedback;
}

} // namespace gemm
} // namespace fastfa
