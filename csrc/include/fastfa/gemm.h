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

// C = A T(B)^T with the transform of `rule` applied to B's tiles (kBackprop: B as it is,
// also for a stored fa R or an estimated B, which the caller passes as B itself).
template <typename Element>
cudaError_t feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                          cudaStream_t stream);

// The transforms feedback_gemm has a kernel for.
inline bool has_feedback_kernel(Rule rule) {
  return rule == Rule::kBackprop || rule == Rule::kFeedbackAlignment || rule == Rule::kUniformSignSymmetry ||
         rule == Rule::kBatchRandomSignFeedback || rule == Rule::kFixedRandomSignFeedback;
}

} // namespace gemm
} // namespace fastfa
