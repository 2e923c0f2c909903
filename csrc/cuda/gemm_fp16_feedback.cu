// The fp16 grad_input kernels with the rule's transform on B's tiles: usf, brsf, frsf, drawn fa.
#include "gemm_kernel.cuh"

namespace fastfa {
namespace gemm {
FASTFA_GEMM_INSTANTIATE_FEEDBACK(Fp16)
} // namespace gemm
} // namespace fastfa
