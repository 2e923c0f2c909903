// Host-side pieces shared by the cuda backend's ops (linear_cuda.cu, conv_cuda.cu): which
// tensor-core path a GPU takes, which passes run on the fused kernels (fastfa/dispatch.h), why a
// call takes the aten path instead (recorded in fastfa/fallbacks.h's record for
// fastfa.last_fallbacks()), the dtype switch.
#pragma once

#include "fastfa/dispatch.h"
#include "fastfa/fallbacks.h"
#include "fastfa/feedback.h"
#include "fastfa/gemm.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

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

// FASTFA_CUDA_FORCE_ATEN=1 (any value but empty or 0) sends every call down the aten path, as
// if the fused kernels could not run: a GPU run of tests/test_cuda.py under it must fail, which
// shows that the tests see which path ran. Read once, at the first call.
inline bool aten_path_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("FASTFA_CUDA_FORCE_ATEN");
    return value != nullptr && std::string_view(value) != "" && std::string_view(value) != "0";
  }();
  return forced;
}

// Why this call cannot use the fused kernels (then it takes the aten path), or nullptr.
inline const char* aten_path_reason(const at::Tensor& input) {
  if (aten_path_forced()) {
    return "forced by FASTFA_CUDA_FORCE_ATEN (the environment variable sends every call to the aten path)";
  }
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

// What the cuda backend's backward records when B's gradient (wm, aa, ia) runs on aten.
constexpr const char* kFeedbackGradientOnAten =
    "B's gradient for wm, aa and ia (the alignment terms run on the aten backend's GEMMs / convolutions)";

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

// The forward's tensors besides y, made like y (empty where the rule and activation need
// none): z where the activation's derivative reads it, r = the GEMM without bias for aa / ia;
// and the epilogue that writes them with bias and activation.
struct ForwardOutputs {
  at::Tensor saved, projection;
  gemm::LinearEpilogueArgs epilogue;
};

inline ForwardOutputs forward_outputs(const at::Tensor& output, const at::Tensor& bias, gemm::Activation activation,
                                      int64_t rule) {
  ForwardOutputs outputs;
  const bool keeps_z = derivative_needs_preactivation(activation), keeps_r = saves_projection(rule);
  outputs.saved = keeps_z ? at::empty_like(output) : output.new_empty({0});
  outputs.projection = keeps_r ? at::empty_like(output) : output.new_empty({0});
  outputs.epilogue.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  outputs.epilogue.saved = keeps_z ? outputs.saved.mutable_data_ptr() : nullptr;
  outputs.epilogue.projection = keeps_r ? outputs.projection.mutable_data_ptr() : nullptr;
  outputs.epilogue.activation = activation;
  return outputs;
}

inline bool has_tensor(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

// grad_input's GEMM as the cost model (fastfa/dispatch.h) sees it: a 4-d W is a conv2d's, in NCHW
// unless channels_last.
inline GradInputCase grad_input_case(Rule rule, bool has_feedback, int64_t distribution, int64_t rows,
                                     const at::Tensor& weight, bool nchw) {
  return {rule, rows, weight.numel(), weight.scalar_type(), nchw, has_feedback,
          static_cast<Distribution>(distribution) == Distribution::kUniform};
}

// The transform a fused grad_input applies to W's tiles as they load: the rule itself, or
// kBackprop where B is used as it is (the estimated rules' B, a stored fa R) or made first by
// the transform kernel (a drawn B where the cost model draws it once: every CTA along M would
// redraw its tiles, which one W-sized pass outgrows from a few row tiles on; any normal draw,
// the kernels drawing uniformly), so nothing is fused.
inline Rule in_kernel_transform(const GradInputCase& problem) {
  const Rule rule = problem.rule;
  if (estimates_feedback(rule) || (rule == Rule::kFeedbackAlignment && problem.stored_feedback)) {
    return Rule::kBackprop;
  }
  if ((rule == Rule::kBatchRandomSignFeedback || rule == Rule::kFeedbackAlignment) && draws_feedback_once(problem)) {
    return Rule::kBackprop;
  }
  return rule;
}

// What grad_input's GEMM reads as B and how it transforms it (in_kernel_transform). Where B is
// a stored tensor it is the operand itself, untransformed; frsf reads R beside W at W's offsets;
// a drawn B that in_kernel_transform does not fuse comes from the transform kernel first, as on
// the aten path. The tensors live while this object does.
struct FeedbackOperand {
  Rule transform;
  at::Tensor operand, stored, state, output_scale;
  gemm::FeedbackArgs args;

  FeedbackOperand(Rule rule, const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                  const std::optional<at::Tensor>& rng, double scale, int64_t distribution,
                  at::MemoryFormat format, int64_t rows)
      : transform(in_kernel_transform(grad_input_case(rule, has_tensor(feedback), distribution, rows, weight,
                                                      weight.dim() == 4 && format == at::MemoryFormat::Contiguous))),
        operand(weight.contiguous(format)) {
    if (transform == Rule::kBackprop && rule != Rule::kBackprop) {
      operand = estimates_feedback(rule) || (rule == Rule::kFeedbackAlignment && has_tensor(feedback))
                    ? feedback->contiguous(format)
                    : feedback_transform_cuda(operand, feedback, rng, static_cast<int64_t>(rule), scale, distribution)
                          .contiguous(format);
    } else if (rule == Rule::kFixedRandomSignFeedback) {
      stored = feedback->contiguous(format);
    }
    TORCH_CHECK(gemm::has_feedback_kernel(transform), "fastfa: no fused grad_input kernel for rule ",
                static_cast<int64_t>(rule));
    state = rng.has_value() && rng->defined() ? rng->contiguous() : at::Tensor();
    args.stored = stored.defined() ? stored.const_data_ptr() : nullptr;
    args.rng = state.defined() ? state.const_data_ptr<int64_t>() : nullptr;
    args.scale = static_cast<float>(scale);
    if (scale_from_weight(rule, scale)) {
      output_scale = rms_scale(weight).to(at::kFloat);
      args.output_scale = output_scale.const_data_ptr<float>();
      args.scale = 1.0f;
    }
  }
};

// Whether grad_input runs on the fused kernel rather than the transform kernel + the vendor GEMM /
// convolution: where every pass is forced onto the fused kernels (FASTFA_CUDA_FUSED), else where
// the cost model (fastfa/dispatch.h) says the fused kernel pays for this shape.
inline bool grad_input_on_fused_kernel(Rule rule, const std::optional<at::Tensor>& feedback, int64_t distribution,
                                       int64_t rows, const at::Tensor& weight, bool nchw) {
  return cuda_fused_passes() ||
         fused_grad_input_pays(grad_input_case(rule, has_tensor(feedback), distribution, rows, weight, nchw));
}

inline int64_t k_tiles(const at::Tensor& like, int64_t k) {
  const int64_t tile_k = gemm::tile_k(like.element_size());
  return (k + tile_k - 1) / tile_k;
}

// K tiles per slice for a split-K GEMM of m x n x k: enough CTAs for two per SM, each slice
// at least four K tiles (at or above k's tile count: no split).
inline int64_t k_tiles_per_split(const at::Tensor& like, int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = k_tiles(like, k);
  const int64_t ctas = ((m + 127) / 128) * ((n + 127) / 128);
  const int64_t sms = at::cuda::getDeviceProperties(like.get_device())->multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (2 * sms + ctas - 1) / ctas);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, tiles / 4));
  return std::max<int64_t>(1, (tiles + splits - 1) / splits);
}


} // namespace fused
} // namespace fastfa
