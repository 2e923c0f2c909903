// The fp16 convolution kernels that use B unchanged: the forward, grad_weight, and
// grad_input for bp, a stored fa R and the estimated rules (implicit GEMMs).
#include "implicit_gemm.cuh"

namespace fastfa {
namespace gemm {
FASTFA_CONV_INSTANTIATE_IDENTITY(Fp16)
} // namespace gemm
} // namespace fastfa
