// The cuda backend's choice of path per pass (issue 18): the vendor GEMM / convolution through
// ATen (cuBLAS(Lt), cuDNN) wherever there is nothing to fuse, and for grad_input, where B = T(W)
// must be made from W, the fused kernel or fastfa's transform kernel + the vendor GEMM; and for a
// drawn B (brsf, drawn fa) on the fused kernel, whether the GEMM draws it tile by tile or the
// transform kernel draws it once first. One cost model decides all of it, here: the cuda ops
// call it per call, and fastfa._backend.auto_plan (reports, tests, benchmarks/fit_auto_costs.py)
// calls the same function through _C._auto_plan (README, "auto" on a GPU). Compiled into every
// build, so that a CPU machine runs the model the GPU uses.
#pragma once

#include "fastfa/feedback.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastfa {

// The model's constants: issue 18's estimates and design/gpu.md's H200 ceilings until a GPU run
// calibrates them (benchmarks/fit_auto_costs.py; fastfa._backend.set_auto_costs applies a fit at
// run time, and fastfa._backend.AUTO_COSTS is read from these defaults). A fraction is a fused
// grad_input's speed over the vendor GEMM's (0: no such kernel); a cuda conv2d in NCHW (element
// by element gathers) scales the cuda fractions by nchw_factor.
struct AutoCosts {
  // H200 bf16 8192^3 matmul through PyTorch: 770-800 TFLOP/s (design/gpu.md); tf32 about half.
  double peak_tflops_bf16 = 770.0, peak_tflops_fp16 = 770.0, peak_tflops_fp32 = 385.0;
  double bandwidth_tbs = 4.3;  // device-to-device copies on the same H200
  double launch_us = 4.0;      // one more kernel (the transform) on the stream
  // Issue 18: cuda usf / frsf / bp (the identity kernel) at 35-45% of cuBLAS; brsf and drawn fa,
  // whose Philox draws every CTA along M redoes, 20-25% and a little above: the static model
  // counts drawn fa's mainloop at 0.80x brsf's instructions (993 against 1,244 per k-tile,
  // benchmarks/results/2026-12-01-sass-mainloop-after3.md). brsf 0.235 and fa 0.2812 are the
  // values in that range that put the draw-once crossover of a 4096x4096 bf16 / fp16 layer at
  // 256 rows, the threshold the kernels had before it was modelled (README, "auto" on a GPU).
  double cuda_usf = 0.40, cuda_brsf = 0.235, cuda_frsf = 0.40, cuda_fa = 0.2812, cuda_bp = 0.40;
  // Issue 18: the Triton grad_input at 40-60% of cuBLAS (modelled; "auto" does not pick it), its
  // identity kernel (bp: a stored B read as it is) at 0.50. brsf 0.2664 and fa 0.3272 are its
  // in-GEMM draws: the values that put its draw-once crossover of a 4096x4096 bf16 / fp16 layer at
  // 256 rows, the fixed DRAW_IN_GEMM_MAX_ROWS the Triton Linear and Conv2d had before the model
  // decided it (no timing says otherwise yet; README, "auto" on a GPU).
  double triton_usf = 0.50, triton_brsf = 0.2664, triton_frsf = 0.50, triton_fa = 0.3272, triton_bp = 0.50;
  // Issue 18: NCHW convolutions under 20% of cuDNN, against 35-45% for the GEMMs.
  double nchw_factor = 0.5;
};

void set_auto_costs(const AutoCosts& costs);
AutoCosts auto_costs();

// Whether the cuda backend runs every pass on its own fused kernels (the GPU check times both
// ways): FASTFA_CUDA_FUSED=1 in the environment at the first call, or fastfa.set_cuda_fused().
// Off by default: forward and grad_weight then take the vendor calls.
bool cuda_fused_passes();
void set_cuda_fused_passes(bool fused);

// One grad_input GEMM of rows x weight_numel (a conv2d: rows = output pixels, the same FLOPs).
struct GradInputCase {
  Rule rule = Rule::kBackprop;
  int64_t rows = 0, weight_numel = 0;
  c10::ScalarType dtype = c10::ScalarType::BFloat16;
  bool nchw = false;             // a conv2d on a contiguous (not channels_last) input
  bool stored_feedback = false;  // fa with a stored R: B used as it is
  bool uniform = true;           // the draw's distribution; the kernels draw only uniformly in the GEMM
};

// The modelled times of grad_input's paths, in seconds (infinity where a path does not exist):
//   vendor GEMM       2 rows numel / peak of the dtype
//   transform         launch + bytes of W read (+ R for frsf; none for drawn fa) and B written / bandwidth
//   vendor            the vendor GEMM, after the transform where B must be made
//   fused             the vendor GEMM / the fused kernel's fraction (times nchw_factor for cuda in NCHW)
// A drawn B on a fused kernel (cuda or Triton, each with its own fractions) goes one of two ways:
// drawn in the GEMM (every CTA along M draws its tiles again: a cost per row, vendor GEMM x
// (1 / fraction(rule) - 1 / fraction(bp)) above the identity kernel), or drawn once by the
// transform kernel and read by the identity kernel (one pass writing B: the transform's time,
// whatever the rows). It is drawn once where that is the faster (ties: in the GEMM), or, on cuda,
// where the GEMM cannot draw it (a normal draw: the Triton kernels draw either distribution).
struct GradInputPlan {
  double vendor = 0.0;
  double cuda = 0.0, cuda_draw_in_gemm = 0.0, cuda_draw_once = 0.0;        // cuda: the better draw
  double triton = 0.0, triton_draw_in_gemm = 0.0, triton_draw_once = 0.0;  // triton: likewise
  bool cuda_draws_once = false;    // a drawn B: made by the transform kernel, then the identity kernel
  bool triton_draws_once = false;  // the same for the Triton backend's grad_input (Linear, Conv2d)
  bool draws = false;              // B is drawn (brsf, drawn fa)
};

GradInputPlan plan_grad_input(const GradInputCase& problem, const AutoCosts& costs);

// The cuda ops' questions, on the constants in use (a few multiplications: cheaper than any cache):
// whether the fused grad_input is modelled faster than the transform kernel + the vendor GEMM
// (never for B used as it is, nor fp64: no fused kernel to win); and whether its drawn B is drawn
// once by the transform kernel rather than in the GEMM.
bool fused_grad_input_pays(const GradInputCase& problem);
bool draws_feedback_once(const GradInputCase& problem);
// The Triton backend's question (triton_kernels/linear.py, conv2d.py, through _C._triton_draw_once_rows):
// from how many rows on its grad_input's drawn B is drawn once by its transform kernel rather than
// in the GEMM (problem.rows is ignored; INT64_MAX: never). A row count, not a yes / no per call, so
// that the caller compares it with rows that torch.compile traces symbolically without fixing them.
int64_t triton_draw_once_rows(const GradInputCase& problem);

} // namespace fastfa
