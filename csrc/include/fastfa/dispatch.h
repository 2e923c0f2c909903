// The cuda backend's choice of path per pass (issue 18): the vendor GEMM / convolution through
// ATen (cuBLAS(Lt), cuDNN) wherever there is nothing to fuse, and for grad_input, where B = T(W)
// must be made from W, the fused kernel or fastfa's transform kernel + the vendor GEMM, by the
// cost model of fastfa._backend.auto_plan (README, "auto" on a GPU). Compiled into every build,
// so that a CPU test can check that this copy of the model decides as the Python one does.
#pragma once

#include "fastfa/feedback.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastfa {

// The model's constants; fastfa._backend sets them from AUTO_COSTS at import (and a calibration
// can set them again). Fractions are the cuda backend's fused grad_input speed over the vendor
// GEMM's, per transform; a conv2d in NCHW (element-by-element gathers) scales them by nchw_factor.
struct AutoCosts {
  double peak_tflops_bf16 = 770.0, peak_tflops_fp16 = 770.0, peak_tflops_fp32 = 385.0;
  double bandwidth_tbs = 4.3;
  double launch_us = 4.0;
  double fraction_usf = 0.40, fraction_brsf = 0.22, fraction_frsf = 0.40, fraction_fa = 0.22;
  double nchw_factor = 0.5;
};

void set_auto_costs(const AutoCosts& costs);
AutoCosts auto_costs();

// Whether the cuda backend runs every pass on its own fused kernels (the GPU check times both
// ways): FASTFA_CUDA_FUSED=1 in the environment at the first call, or fastfa.set_cuda_fused().
// Off by default: forward and grad_weight then take the vendor calls.
bool cuda_fused_passes();
void set_cuda_fused_passes(bool fused);

// Whether a fused grad_input that applies `transform` in its tile loads (Rule::kBackprop: B is
// used as it is, nothing to fuse) is modelled faster than the transform kernel + the vendor GEMM,
// for a GEMM of rows x weight_numel (a conv2d: rows = output pixels, the same FLOPs). A few
// multiplications: cheaper than any cache of its answer.
bool fused_grad_input_pays(Rule transform, int64_t rows, int64_t weight_numel, c10::ScalarType dtype, bool nchw);

} // namespace fastfa
