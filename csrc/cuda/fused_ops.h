// Host-side pieces shared by the cuda backend's ops (linear_cuda.cu, conv_cuda.cu): which
// tensor-core path a GPU takes, why a call takes the aten path instead, the dtype switch.
#pragma once

#include "fastfa/feedback.h"
#include "fastfa/gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>

namespace fastfa {
namespace fused {

inline gemm::Activation device_activation(c10::string_view name) {
  if (name == "none") return gemm::Activation::kNone;
  if (name == "relu") return gemm::Activation::kRelu;
  if (name == "gelu") return gemm::Activation::kGelu;
  if (name == "gelu_tanh") return gemm::Activation::kGeluTanh;
  if (name == "silu") return gemm::Activation::kSilu;
  if (name == "tanh") return gemm::Activation::kTanh;
  if (name == "sigmoid") return gemm::Activation::kSigmoid;
  TORCH_CHECK(false, "fastfa: activation must be one of none, relu, gelu, gelu_tanh, silu, tanh, sigmoid; got '",
              name, "'");
}

inline bool derivative_needs_preactivation(gemm::Activation activation) {
  return activation == gemm::Activation::kGelu || activation == gemm::Activation::kGeluTanh ||
         activation == gemm::Activation::kSilu;
}

inline bool saves_projection(int64_t rule) {
  const auto kind = static_cast<Rule>(rule);
  return kind == Rule::kActivationAlignment || kind == Rule::kInformationAlignment;
}

// The tensor-core path for this GPU: wgmma where the binary has sm_90a code and the GPU is
// an sm_90, else mma.sync (sm_80 and later).
inline gemm::Arch device_arch(const at::Tensor& tensor) {
  const cudaDeviceProp* properties = at::cuda::getDeviceProperties(tensor.get_device());
#ifdef FASTFA_HAS_SM90A
  if (properties->major == 9 && properties->minor == 0) {
    return gemm::Arch::kSm90a;
  }
#endif
  (void)properties;
  return gemm::Arch::kSm80;
}

// Why this call cannot use the fused kernels (then it takes the aten path), or nullptr.
inline const char* aten_path_reason(const at::Tensor& input) {
  const cudaDeviceProp* properties = at::cuda::getDeviceProperties(input.get_device());
  if (properties->major < 8) {
    return "on a GPU below compute capability 8.0 (the fused kernels need sm_80's tensor cores)";
  }
  switch (input.scalar_type()) {
  case at::kBFloat16:
  case at::kHalf:
    return nullptr;
  case at::kFloat:
    return at::globalContext().allowTF32CuBLAS()
               ? nullptr
               : "fp32 while torch.backends.cuda.matmul.allow_tf32 is False (the fused kernels compute fp32 "
                 "through tf32)";
  default:
    return "fp64 (the fused kernels cover fp16, bf16 and tf32)";
  }
}

template <class Launch>
inline cudaError_t with_element(at::ScalarType dtype, Launch launch) {
  switch (dtype) {
  case at::kBFloat16:
    return launch(gemm::Bf16{});
  case at::kHalf:
    return launch(gemm::Fp16{});
  default:
    return launch(gemm::Tf32{});
  }
}

inline void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fastfa: the cuda backend's ", what, " kernel failed to launch: ",
              cudaGetErrorString(status));
}

inline const void* data_or_null(const at::Tensor& tensor) { return tensor.defined() ? tensor.const_data_ptr() : nullptr; }

} // namespace fused
} // namespace fastfa
