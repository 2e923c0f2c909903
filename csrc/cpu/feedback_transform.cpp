// The feedback transform on the CPU: B = T(W) in one parallel pass over W.
#include "clones.h"
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>

namespace fastfa {
namespace {

// Unit draws for `count` consecutive elements. The Philox rounds run over a small array
// with no branches, so the compiler vectorises them (32x32->64-bit multiplies map to
// pmuludq); one element at a time they would cost ~25 ns each.
constexpr int64_t kDrawChunk = 256;

FASTFA_AVX2_CLONES
void unit_draws(uint64_t seed, uint64_t step, int64_t begin, int64_t count, Distribution distribution,
                DrawIndex draw_index, float* xi) {
  if (draw_index.channels_last) {
    // Logical indices are not consecutive in memory: one block per element.
    for (int64_t j = 0; j < count; ++j) {
      xi[j] = unit_draw(seed, step, draw_index(begin + j), distribution);
    }
    return;
  }
  // The blocks covering [begin, begin + count): Philox over the blocks into one array per
  // word (unit-stride stores, so the rounds vectorise), then the words laid out by element.
  const int64_t first_block = begin >> 2;
  const int64_t blocks = ((begin + count - 1) >> 2) - first_block + 1;
  constexpr int64_t kMaxBlocks = kDrawChunk / 4 + 2;
  uint32_t word0[kMaxBlocks], word1[kMaxBlocks], word2[kMaxBlocks], word3[kMaxBlocks];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t step0 = static_cast<uint32_t>(step), step1 = static_cast<uint32_t>(step >> 32);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t block = static_cast<uint64_t>(first_block + b);
    const Philox4x32 bits =
        philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), step0, step1, key0, key1);
    word0[b] = bits.x0;
    word1[b] = bits.x1;
    word2[b] = bits.x2;
    word3[b] = bits.x3;
  }
  uint32_t words[4 * kMaxBlocks];
  for (int64_t b = 0; b < blocks; ++b) {
    words[4 * b] = word0[b];
    words[4 * b + 1] = word1[b];
    words[4 * b + 2] = word2[b];
    words[4 * b + 3] = word3[b];
  }
  const uint32_t* element_words = words + (begin - 4 * first_block);
  if (distribution == Distribution::kUniform) {
    for (int64_t j = 0; j < count; ++j) {
      xi[j] = 2.0f * unit_uniform(element_words[j]) - 1.0f;
    }
    return;
  }
  const int64_t offset = begin - 4 * first_block;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t element = offset + j;
    xi[j] = unit_from_words(words + (element & ~int64_t(3)), static_cast<uint32_t>(element & 3), distribution);
  }
}

// One loop per rule, with the rule a compile-time constant: feedback_transform's switch
// folds away and the loop body is straight-line code the compiler can vectorise.
template <Rule kRule, typename scalar_t>
void transform_range(const scalar_t* weight, const scalar_t* stored, scalar_t* out, int64_t begin, int64_t end,
                     at::opmath_type<scalar_t> scale, Distribution distribution, uint64_t seed, uint64_t step,
                     DrawIndex draw_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kDraws = kRule == Rule::kBatchRandomSignFeedback || kRule == Rule::kFeedbackAlignment;
  if constexpr (kDraws) {
    if (stored == nullptr) {
      float xi[kDrawChunk];
      for (int64_t chunk = begin; chunk < end; chunk += kDrawChunk) {
        const int64_t count = std::min(kDrawChunk, end - chunk);
        unit_draws(seed, step, chunk, count, distribution, draw_index, xi);
        for (int64_t j = 0; j < count; ++j) {
          const auto x = static_cast<opmath_t>(xi[j]);
          // r: fa regenerating R = scale * xi from (seed, step, index)
          out[chunk + j] = static_cast<scalar_t>(
              feedback_transform<opmath_t>(kRule, static_cast<opmath_t>(weight[chunk + j]), scale * x, x, scale));
        }
      }
      return;
    }
  }
  constexpr bool kReadsStored =
      kRule == Rule::kFeedbackAlignment || kRule == Rule::kFixedRandomSignFeedback || estimates_feedback(kRule);
  for (int64_t i = begin; i < end; ++i) {
    opmath_t r = opmath_t(0);
    if constexpr (kReadsStored) {
      r = static_cast<opmath_t>(stored[i]);
    }
    out[i] = static_cast<scalar_t>(
        feedback_transform<opmath_t>(kRule, static_cast<opmath_t>(weight[i]), r, opmath_t(0), scale));
  }
}

template <typename scalar_t>
void transform_kernel(const scalar_t* weight, const scalar_t* stored, scalar_t* out, int64_t numel, Rule rule,
                      double scale, Distribution distribution, uint64_t seed, uint64_t step, DrawIndex draw_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto s = static_cast<opmath_t>(scale);
  // About 32 KiB of W per task: large enough to amortise the thread hand-off.
  constexpr int64_t kGrain = 8192;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    switch (rule) {
    case Rule::kBackprop:
      return transform_range<Rule::kBackprop>(weight, stored, out, begin, end, s, distribution, seed, step, draw_index);
    case Rule::kFeedbackAlignment:
      return transform_range<Rule::kFeedbackAlignment>(weight, stored, out, begin, end, s, distribution, seed, step,
                                                       draw_index);
    case Rule::kUniformSignSymmetry:
      return transform_range<Rule::kUniformSignSymmetry>(weight, stored, out, begin, end, s, distribution, seed,
                                                         step, draw_index);
    case Rule::kBatchRandomSignFeedback:
      return transform_range<Rule::kBatchRandomSignFeedback>(weight, stored, out, begin, end, s, distribution, seed,
                                                             step, draw_index);
    case Rule::kFixedRandomSignFeedback:
      return transform_range<Rule::kFixedRandomSignFeedback>(weight, stored, out, begin, end, s, distribution, seed,
                                                             step, draw_index);
    default: // the estimated rules: B is the stored tensor
      return transform_range<Rule::kKolenPollack>(weight, stored, out, begin, end, s, distribution, seed, step,
                                                  draw_index);
    }
  });
}

// usf with its rms scale, B = s * sign(W) with s = sqrt(sum(w^2) / n): one pass over W both
// writes sign(W) into B (exact in every dtype) and sums w^2; then B *= s runs over B alone (a
// layer's B just written, from cache), or the caller scales B's product (deferred_scale). Two
// passes over W (the sum, then the transform) read resnet18's 45 MB of weights twice per step.
// The sum is in double, in chunks of kSumGrain with eight lanes per chunk (so the loop vectorises
// without reassociating one accumulator). B's values are those of scale * sign_of(w) in
// feedback_transform, rounded once at s.
// B never aliases W (__restrict__): otherwise each store to B could change W, and the loop stays
// scalar.
template <typename scalar_t>
FASTFA_AVX2_CLONES
double signs_and_sum_of_squares(const scalar_t* __restrict__ weight, scalar_t* __restrict__ out, int64_t begin,
                                int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  double lanes[8] = {};
  double partial = 0.0;
  int64_t i = begin;
  // A counted loop: the extension builds with -fwrapv (Python's flags), under which `i + 8 <= end`
  // may wrap, so GCC cannot count its trips and leaves it scalar.
  const int64_t blocks = (end - begin) / 8;
  for (int64_t block = 0; block < blocks; ++block, i += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const auto w = static_cast<opmath_t>(weight[i + lane]);
      lanes[lane] += static_cast<double>(w) * static_cast<double>(w);
      out[i + lane] = static_cast<scalar_t>(sign_of(w));
    }
  }
  for (; i < end; ++i) {
    const auto w = static_cast<opmath_t>(weight[i]);
    partial += static_cast<double>(w) * static_cast<double>(w);
    out[i] = static_cast<scalar_t>(sign_of(w));
  }
  for (const double lane : lanes) partial += lane;
  return partial;
}

template <typename scalar_t>
FASTFA_AVX2_CLONES
void scale_range(scalar_t* out, int64_t begin, int64_t end, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    out[i] = static_cast<scalar_t>(scale * static_cast<opmath_t>(out[i]));
  }
}

// Returns s; B *= s only where `apply` (else the caller applies s, deferred_scale).
// A W below kParallelMin runs on the calling thread: at::parallel_reduce splits a W of two or
// three chunks into uneven tasks (36864 = 32768 + 4096 for resnet18's layer1), and opening an
// OpenMP region for them costs more than the second thread saves (resnet18's usf step at the
// bench's two threads). Above it, chunks of kSumGrain per task.
template <typename scalar_t>
double rms_sign_kernel(const scalar_t* weight, scalar_t* out, int64_t numel, bool apply) {
  constexpr int64_t kSumGrain = 32768;
  constexpr int64_t kParallelMin = 4 * kSumGrain;
  const bool inline_pass = numel < kParallelMin;
  const double sum = inline_pass ? signs_and_sum_of_squares(weight, out, 0, numel)
                                 : at::parallel_reduce(
                                       0, numel, kSumGrain, 0.0,
                                       [&](int64_t begin, int64_t end, double partial) {
                                         return partial + signs_and_sum_of_squares(weight, out, begin, end);
                                       },
                                       std::plus<double>());
  const double rms = std::sqrt(sum / static_cast<double>(numel));
  if (apply) {
    const auto scale = static_cast<at::opmath_type<scalar_t>>(rms);
    if (inline_pass) {
      scale_range(out, 0, numel, scale); // B just written, from cache
    } else {
      at::parallel_for(0, numel, kSumGrain, [&](int64_t begin, int64_t end) { scale_range(out, begin, end, scale); });
    }
  }
  return rms;
}

// Writes B = T(W) into `out`, which has W's shape and the dense layout of memory_format.
// Returns the factor left to apply to B's products: 1, or with `defer_scale` usf's rms scale s,
// where `out` is then sign(W) (feedback_for_backward_cpu's deferred_scale).
// usf's rms scale (kRmsScale) is read from W here, on the host, in the transform's pass
// (rms_sign_kernel): as a tensor (norm, divide, then B *= s) it cost three more op dispatches
// per step, more than the transform itself on a small W.
double transform_into(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                      const std::optional<at::Tensor>& rng, int64_t rule, double scale, int64_t distribution,
                      at::MemoryFormat memory_format, bool defer_scale, at::Tensor& out) {
  const auto kind = static_cast<Rule>(rule);
  const bool has_feedback = feedback.has_value() && feedback->defined();
  const bool uses_stored = has_feedback && (kind == Rule::kFeedbackAlignment ||
                                            kind == Rule::kFixedRandomSignFeedback || estimates_feedback(kind));
  // The kernel walks W, R and B with one flat index, so all three share W's layout
  // (channels_last included).
  const at::Tensor w = weight.contiguous(memory_format);
  const at::Tensor r = uses_stored ? feedback->contiguous(memory_format) : at::Tensor();
  DrawIndex draw_index;
  if (memory_format == at::MemoryFormat::ChannelsLast) {
    draw_index = {true, static_cast<uint64_t>(w.size(1)), static_cast<uint64_t>(w.size(2)),
                  static_cast<uint64_t>(w.size(3))};
  }
  uint64_t seed = 0, step = 0;
  if (rng.has_value() && rng->defined()) {
    const at::Tensor state = rng->contiguous();
    seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
    step = static_cast<uint64_t>(state.data_ptr<int64_t>()[1]);
  }
  if (w.numel() == 0) {
    return 1.0;
  }
  double deferred = 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "feedback_transform_cpu", [&] {
    if (scale_from_weight(kind, scale)) {
      const double rms =
          rms_sign_kernel<scalar_t>(w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), w.numel(),
                                    /*apply=*/!defer_scale);
      deferred = defer_scale ? rms : 1.0;
      return;
    }
    transform_kernel<scalar_t>(w.const_data_ptr<scalar_t>(), uses_stored ? r.const_data_ptr<scalar_t>() : nullptr,
                               out.mutable_data_ptr<scalar_t>(), w.numel(), kind, scale,
                               static_cast<Distribution>(distribution), seed, step, draw_index);
  });
  return deferred;
}

void check_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "fastfa: the CPU feedback transform needs a CPU weight, got ",
              weight.device());
}

} // namespace

at::Tensor feedback_transform_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                  const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                  int64_t distribution) {
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_cpu(weight);
  const auto memory_format = weight.suggest_memory_format();
  // A contiguous W's B is allocated without an op dispatch (empty_like dispatches empty_like, then
  // empty_strided): wm draws its noise through here on every step of a small layer, where that
  // dispatch is a measurable part of the step. Both give a contiguous, unpinned tensor.
  at::Tensor out = memory_format == at::MemoryFormat::Contiguous && weight.is_contiguous()
                       ? at::detail::empty_cpu(weight.sizes(), weight.scalar_type())
                       : at::empty_like(weight, weight.options(), memory_format);
  transform_into(weight, feedback, rng, rule, scale, distribution, memory_format, /*defer_scale=*/false, out);
  return out;
}

at::Tensor feedback_for_backward_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& feedback,
                                     const std::optional<at::Tensor>& rng, int64_t rule, double scale,
                                     int64_t distribution, double* deferred_scale) {
  check_feedback_arguments(weight, feedback, rng, rule, scale, distribution);
  check_cpu(weight);
  // A fresh W-sized tensor each step costs a page fault per 4 KiB on first touch (the CPU
  // allocator returns large blocks to the OS): at 4096x4096 that is 5x the transform
  // itself. One buffer per thread and dtype, kept between steps, has no such cost; per dtype, so
  // that layers of two dtypes on one thread (an fp32 head after bf16 autocast) do not reallocate
  // it at every call. Each holds the largest W of its dtype seen on its thread; B is a view of
  // it, so it is valid until this thread's next call: the callers use it at once (a GEMM or
  // convolution argument) and never keep it.
  struct Workspace {
    at::Tensor buffer;
    // The buffer viewed with W's shape and layout, kept too: a layer's every step asks for the same
    // one, and making the view (an op dispatch and a tensor) costs about what usf's transform of a
    // small W costs.
    at::Tensor out;
  };
  thread_local std::array<Workspace, 4> workspaces; // fp64, fp32, fp16, bf16
  const auto dtype = weight.scalar_type();
  Workspace& workspace = workspaces[dtype == at::kDouble ? 0 : dtype == at::kFloat ? 1 : dtype == at::kHalf ? 2 : 3];
  const int64_t numel = weight.numel();
  if (!workspace.buffer.defined() || workspace.buffer.numel() < numel || workspace.buffer.scalar_type() != dtype) {
    workspace = Workspace{}; // free the old buffer before allocating the new one
    workspace.buffer = at::empty({numel}, weight.options());
  }
  const auto memory_format = weight.suggest_memory_format();
  c10::DimVector strides = c10::contiguous_strides(weight.sizes());
  if (memory_format == at::MemoryFormat::ChannelsLast) {
    const std::vector<int64_t> channels_last = c10::get_channels_last_strides_2d(weight.sizes());
    strides.assign(channels_last.begin(), channels_last.end());
  }
  at::Tensor& out = workspace.out;
  if (!(out.defined() && out.sizes() == weight.sizes() && out.strides() == at::IntArrayRef(strides))) {
    out = workspace.buffer.as_strided(weight.sizes(), strides);
  }
  // fp16 and bf16 keep s in B: a product with sign(W) may overflow fp16, and both would round twice.
  const bool defer = deferred_scale != nullptr &&
                     (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble);
  const double left = transform_into(weight, feedback, rng, rule, scale, distribution, memory_format, defer, out);
  if (deferred_scale != nullptr) *deferred_scale = left;
  return out;
}

at::Tensor direct_feedback_cpu(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                               int64_t column_count, double scale, int64_t distribution, at::ScalarType dtype) {
  TORCH_CHECK(rng.device().is_cpu(), "fastfa: the CPU direct feedback draw needs a CPU rng, got ", rng.device());
  check_direct_feedback_draw_arguments(rng, rows, columns, column_begin, column_count, scale, distribution, dtype);
  at::Tensor out = at::empty({rows, column_count}, rng.options().dtype(dtype));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor state = rng.contiguous();
  const auto seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
  const auto step = static_cast<uint64_t>(state.data_ptr<int64_t>()[1]);
  const auto kind = static_cast<Distribution>(distribution);
  // Element (k, f) of the whole K x F matrix is keyed by its row-major index k * F + f, as fa
  // keys R's elements, so any column block is the same numbers as the matching slice of the
  // whole B_l: a caller can project block by block without ever holding K x F.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "direct_feedback_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto s = static_cast<opmath_t>(scale);
    scalar_t* data = out.mutable_data_ptr<scalar_t>();
    const int64_t chunks_per_row = (column_count + kDrawChunk - 1) / kDrawChunk;
    at::parallel_for(0, rows * chunks_per_row, 32, [&](int64_t begin, int64_t end) {
      float xi[kDrawChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / chunks_per_row;
        const int64_t first = (task % chunks_per_row) * kDrawChunk;
        const int64_t count = std::min(kDrawChunk, column_count - first);
        unit_draws(seed, step, row * columns + column_begin + first, count, kind, DrawIndex{}, xi);
        scalar_t* destination = data + row * column_count + first;
        for (int64_t j = 0; j < count; ++j) {
          destination[j] = static_cast<scalar_t>(s * static_cast<opmath_t>(xi[j]));
        }
      }
    });
  });
  return out;
}

} // namespace fastfa
