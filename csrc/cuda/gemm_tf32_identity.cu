// The tf32 kernels that use B unchanged: the linear forward, and grad_input / grad_weight for
// bp, a stored fa R and the estimated rules (one file per group, so builds parallelise).
#include "gemm_kernel.cuh"

namespace fastfa {
namespace gemm {
FASTFA_GEMM_INSTANTIATE_IDENTITY(Tf32)
} // namespace gemm
} // namespace fastfa
