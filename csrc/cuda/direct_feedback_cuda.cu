// dfa on the GPU (learning-rules.md, "Direct feedback alignment"; python/fastfa/dfa.py).
//
//   direct_feedback_cuda          a block of B_l's columns, drawn on the device (the aten
//                                 backend's blocked product, feedback_weight())
//   cuda_direct_feedback_product  the cuda backend's grad_x = e B_l: drawn fa's fused GEMM
//                                 (gemm.h's direct_feedback_problem), which draws B_l's tiles
//                                 from (seed, index) between the loads and the MMA, so B_l is
//                                 never written to memory
// What the fused kernel does not cover takes the aten path (direct_feedback_product: B_l drawn
// here a block at a time, then cuBLAS), recorded with its reason: the linear ops' reasons
// (fp64, fp32 without tf32, GPUs below sm_80), and a normal init, since the kernels draw
// uniformly only (gemm_kernel.cuh: a normal draw's sinf / cosf spill).
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#ifdef FASTFA_WITH_FUSED_CUDA
#include "fused_ops.h"
#endif

namespace fastfa {
namespace {

// Element (k, f) of B_l is keyed by k * columns + f, as direct_feedback_cpu; out holds the
// columns [column_begin, column_begin + count). One element per thread: a block's columns do
// not start on a Philox block in general, and this path is the fallback (the fused product
// draws four elements per Philox block).
template <typename scalar_t>
__global__ void direct_feedback_kernel(scalar_t* __restrict__ out, int64_t rows, int64_t columns,
                                       int64_t column_begin, int64_t count, double scale, Distribution distribution,
                                       const int64_t* __restrict__ rng) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto s = static_cast<opmath_t>(scale);
  const uint64_t seed = static_cast<uint64_t>(rng[0]), step = static_cast<uint64_t>(rng[1]);
  const int64_t numel = rows * count;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / count, column = column_begin + i % count;
    const float xi = unit_draw(seed, step, static_cast<uint64_t>(row * columns + column), distribution);
    out[i] = static_cast<scalar_t>(s * static_cast<opmath_t>(xi));
  }
}

} // namespace

at::Tensor direct_feedback_cuda(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                                int64_t column_count, double scale, int64_t distribution, at::ScalarType dtype) {
  TORCH_CHECK(rng.is_cuda(), "fastfa: the CUDA direct feedback draw needs a CUDA rng, got ", rng.device());
  check_direct_feedback_draw_arguments(rng, rows, columns, column_begin, column_count, scale, distribution, dtype);
  const c10::cuda::CUDAGuard device_guard(rng.device());
  at::Tensor out = at::empty({rows, column_count}, rng.options().dtype(dtype));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor state = rng.contiguous();
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::min((out.numel() + kThreads - 1) / kThreads, max_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "direct_feedback_cuda", [&] {
    direct_feedback_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), rows, columns, column_begin, column_count, scale,
        static_cast<Distribution>(distribution), state.const_data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

#ifdef FASTFA_WITH_FUSED_CUDA
at::Tensor cuda_direct_feedback_product(const at::Tensor& error, const at::Tensor& rng, int64_t columns,
                                        double scale, int64_t distribution, int64_t block_elements) {
  check_direct_feedback_product_arguments(error, rng, columns, scale, distribution);
  TORCH_CHECK(error.is_cuda() && rng.device() == error.device(),
              "fastfa: cuda_direct_feedback_product needs error and rng on one CUDA device, got ", error.device(),
              " and ", rng.device());
  const char* reason = fused::aten_path_reason(error);
  if (reason == nullptr && distribution != static_cast<int64_t>(Distribution::kUniform)) {
    reason = "a normal init (the fused kernels draw B_l uniformly: kaiming and xavier)";
  }
  if (reason != nullptr) {
    TORCH_WARN_ONCE("fastfa: the cuda backend runs dfa's e B_l in ", reason, " on the aten path (cuBLAS)");
    record_fallback("cuda_dfa_grad_input", reason);
    return direct_feedback_product(error, rng, columns, scale, distribution, block_elements);
  }
  const c10::cuda::CUDAGuard device_guard(error.device());
  const at::Tensor e = error.contiguous();
  const int64_t rows = e.size(0), width = e.size(1);
  at::Tensor grad_input = at::empty({rows, columns}, e.options());
  if (grad_input.numel() == 0) {
    return grad_input;
  }
  if (width == 0) {
    return grad_input.zero_();
  }
  const at::Tensor state = rng.contiguous();
  gemm::FeedbackArgs feedback;
  feedback.rng = state.const_data_ptr<int64_t>();
  feedback.scale = static_cast<float>(scale);
  const gemm::Problem problem =
      gemm::direct_feedback_problem(rows, width, columns, e.const_data_ptr(), grad_input.mutable_data_ptr());
  const gemm::Arch arch = fused::device_arch(e);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  fused::check_launch(fused::with_element(e.scalar_type(),
                                          [&](auto element) {
                                            return gemm::feedback_gemm<decltype(element)>(
                                                arch, Rule::kFeedbackAlignment, problem, feedback, stream);
                                          }),
                      "dfa grad_input");
  return grad_input;
}
#endif

} // namespace fastfa
