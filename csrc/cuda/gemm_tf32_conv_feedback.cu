// The tf32 convolution grad_input kernels with the rule's transform on W's elements: usf,
// brsf, frsf, drawn fa (implicit GEMMs).
#include "implicit_gemm.cuh"

namespace fastfa {
namespace gemm {
FASTFA_CONV_INSTANTIATE_FEEDBACK(Tf32)
} // namespace gemm
} // namespace fastfa
