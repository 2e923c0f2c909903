// The feedback transform on the GPU: B = T(W) in one elementwise pass over W.
// The aten backend runs it before cuBLAS / cuDNN; the fused backends apply the same
// fastfa::feedback_transform to W's tiles as they load them instead.
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastfa {
namespace {

template <typename scalar_t>
__global__ void feedback_transform_kernel(const scalar_t* __restrict__ weight,
                                          const scalar_t* __restrict__ stored,
                                          scalar_t* __restrict__ out, int64_t numel, Rule rule,
                                          double scale, Distribution distribution,
                                          const int64_t* __restrict__ rng, DrawIndex draw_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto s = static_cast<opmath_t>(scale);
  // [seed, step] is read here rather than on the host, so a step counter living on
  // the GPU never forces a device-to-host synchronisation.
  const uint64_t seed = rng != nullptr ? static_cast<uint64_t>(rng[0]) : 0;
  const uint64_t step = rng != nullptr ? static_cast<uint64_t>(rng[1]) : 0;
  const bool draws = rule == Rule::kBatchRandomSignFeedback ||
                     (rule == Rule::kFeedbackAlignment && stored == nullptr);
  // A thread takes four consecutive elements: in W's row-major layout they share one
  // Philox block (element i takes word i % 4 of block i / 4), so each block is computed once.
  const int64_t groups = (numel + 3) / 4;
  for (int64_t group = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; group < groups;
       group += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t words[4] = {0, 0, 0, 0};
    if (draws && !draw_index.channels_last) {
      const Philox4x32 bits = draw_block(seed, step, static_cast<uint64_t>(group));
      words[0] = bits.x0;
      words[1] = bits.x1;
      words[2] = bits.x2;
      words[3] = bits.x3;
    }
#pragma unroll
    for (uint32_t lane = 0; lane < 4; ++lane) {
      const int64_t i = 4 * group + lane;
      if (i >= numel) {
        break;
      }
      opmath_t xi = opmath_t(0);
      if (draws) {
        // channels_last: logical indices are not consecutive in memory, one block each.
        xi = static_cast<opmath_t>(draw_index.channels_last ? unit_draw(seed, step, draw_index(i), distribution)
                                                            : unit_from_words(words, lane, distribution));
      }
      const opmath_t r = stored != nullptr ? static_cast<opmath_t>(stored[i]) : s * xi;
      const opmath_t w = static_cast<opmath_t>(weight[i]);
      out[i] = static_cast<scalar_t>(feedback_transform<opmath_t>(rule, w, r, xi, s));
    }
  }
}

} // namespace

at::Tensor feedback_transform_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                   const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                   int64_t distribution) {
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  TORCH_CHECK(weight.is_cuda(), "fastfa: feedback_transform_cuda needs a CUDA weight, got ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const auto kind = static_cast<Rule>(rule);
  const bool has_feedback = feedback.has_value() && feedback->defined();
  const bool uses_stored = has_feedback && (kind == Rule::kFeedbackAlignment ||
                                            kind == Rule::kFixedRandomSignFeedback || estimates_feedback(kind));
  const auto memory_format = weight.suggest_memory_format();
  const at::Tensor w = weight.contiguous(memory_format);
  const at::Tensor r = uses_stored ? feedback->contiguous(memory_format) : at::Tensor();
  const bool has_rng = rng.has_value() && rng->defined();
  const at::Tensor state = has_rng ? rng->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(w, w.options(), memory_format);
  const int64_t numel = w.numel();
  if (numel == 0) {
    return out;
  }
  DrawIndex draw_index;
  if (memory_format == at::MemoryFormat::ChannelsLast) {
    draw_index = {true, static_cast<uint64_t>(w.size(1)), static_cast<uint64_t>(w.size(2)),
                  static_cast<uint64_t>(w.size(3))};
  }
  constexpr int kThreads = 256;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t groups = (numel + 3) / 4; // four elements per thread
  const int blocks = static_cast<int>(std::min((groups + kThreads - 1) / kThreads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  // usf's "rms": sign(W) here, times s (a device scalar, no host synchronisation) below.
  const bool from_weight = scale_from_weight(kind, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "feedback_transform_cuda", [&] {
    feedback_transform_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), uses_stored ? r.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), numel, kind, from_weight ? 1.0 : scale,
        static_cast<Distribution>(distribution), has_rng ? state.const_data_ptr<int64_t>() : nullptr,
        draw_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return from_weight ? out.mul_(rms_scale(weight)) : out;
}

} // namespace fastfa
