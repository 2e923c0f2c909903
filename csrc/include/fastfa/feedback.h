// The math of every fixed / sign feedback rule, shared by the CPU and CUDA kernels.
//
// A rule is a small enum and its transform one inline function, so every kernel
// (the aten backend's transform pass today, fused GEMM prologues later) applies the
// same formula. python/fastfa/rules.py holds the same table for Python.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTFA_HOST_DEVICE inline
#endif

namespace fastfa {

// Values are part of the op contract (the `rule` argument of every fastfa op).
enum class Rule : int64_t {
  kBackprop = 0,                // B = W
  kFeedbackAlignment = 1,       // B = R (stored), or scale * xi_t when drawn
  kUniformSignSymmetry = 2,     // B = scale * sign(W)
  kBatchRandomSignFeedback = 3, // B = scale * |xi_t| * sign(W), a fresh draw per step
  kFixedRandomSignFeedback = 4, // B = |R| * sign(W)
  // Estimated feedback: B is a trainable tensor (stored); the rule defines B's gradient.
  kKolenPollack = 5,          // grad_W + alpha * 2B
  kWeightMirror = 6,          // alpha * 2B - beta * (1/N) r^T xi, xi ~ N(0, sigma^2), r = xi W^T
  kSymmetricAlignment = 7,    // 2 alpha B - beta W
  kActivationAlignment = 8,   // alpha (2/N) p^T x - beta (1/N) r^T x
  kInformationAlignment = 9,  // -alpha (1/N) r^T x + beta (2/N) r^T (r B) + gamma 2B
};
constexpr int64_t kNumRules = 10;

FASTFA_HOST_DEVICE constexpr bool estimates_feedback(Rule rule) {
  return static_cast<int64_t>(rule) >= static_cast<int64_t>(Rule::kKolenPollack);
}

// usf's scale "rms" in the op contract's `scale`: s = ||W|| / sqrt(numel(W)), taken from the
// current W at every step (so ||B|| = ||W||), on W's device. A negative scale is never a usf
// scale a user can choose (fastfa.rules refuses it), so it is free to mean this.
constexpr double kRmsScale = -1.0;

FASTFA_HOST_DEVICE constexpr bool scale_from_weight(Rule rule, double scale) {
  return rule == Rule::kUniformSignSymmetry && scale == kRmsScale;
}

// Distribution of the unit draw xi; scale turns it into R's init distribution.
enum class Distribution : int64_t {
  kUniform = 0, // xi ~ U(-1, 1): R ~ U(-scale, scale)
  kNormal = 1,  // xi ~ N(0, 1):  R ~ N(0, scale^2)
};

FASTFA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox-4x32-10 (Salmon et al. 2011), the counter-based generator of cuRAND and
// Triton's tl.philox. Counter: (block lo, block hi, step lo, step hi) with block = the
// element's index / 4; key: the seed.
// The same (seed, step, index) gives the same bits on every backend and device, so a
// kernel can regenerate R_t instead of storing it, and Triton's
// tl.philox(seed, c0, c1, c2, c3) reproduces it element for element.
struct Philox4x32 {
  uint32_t x0, x1, x2, x3;
};

FASTFA_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                            uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev0 = c0, prev2 = c2;
    c0 = mulhi32(kRoundB, prev2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, prev0) ^ c3 ^ k1;
    c1 = kRoundB * prev2;
    c3 = kRoundA * prev0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// Bits to [0, 1) exactly as Triton's uint_to_uniform_float does for 32-bit ints,
// so the Triton backend's draws match bit for bit.
FASTFA_HOST_DEVICE float unit_uniform(uint32_t bits) {
  int32_t value = static_cast<int32_t>(bits);
  value = value < 0 ? ~value : value; // -x - 1 without signed overflow
  return static_cast<float>(value) * 4.6566127342e-10f;
}

// Element `index` takes word index % 4 of the Philox block at counter index / 4, so one
// Philox call gives four draws. Uniform: 2u - 1 in [-1, 1). Normal: Box-Muller on the
// word pairs (0, 1) and (2, 3), cos for the even element of a pair and sin for the odd,
// as Triton's pair_uniform_to_normal (u1 clamped away from 0 so log stays finite).
FASTFA_HOST_DEVICE float unit_from_words(const uint32_t* words, uint32_t lane, Distribution distribution) {
  if (distribution == Distribution::kUniform) {
    return 2.0f * unit_uniform(words[lane]) - 1.0f;
  }
  const uint32_t pair = lane & ~1u;
  const float u1 = fmaxf(1.0e-7f, unit_uniform(words[pair]));
  const float u2 = unit_uniform(words[pair + 1]);
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.283185307179586f * u2;
  return (lane & 1u) ? radius * sinf(angle) : radius * cosf(angle);
}

// The Philox block holding element `index`'s draw at `step`.
FASTFA_HOST_DEVICE Philox4x32 draw_block(uint64_t seed, uint64_t step, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The unit draw xi for element `index` (its row-major index in W's shape) at `step`.
FASTFA_HOST_DEVICE float unit_draw(uint64_t seed, uint64_t step, uint64_t index, Distribution distribution) {
  const Philox4x32 bits = draw_block(seed, step, index >> 2);
  const uint32_t words[4] = {bits.x0, bits.x1, bits.x2, bits.x3};
  return unit_from_words(words, static_cast<uint32_t>(index & 3u), distribution);
}

// Draws are keyed by an element's logical (row-major) index in W's shape, so B does
// not depend on W's memory layout. For a channels_last filter (out, in, kh, kw) stored
// as [out][kh][kw][in], this maps a memory offset back to the logical index.
FASTFA_HOST_DEVICE uint64_t logical_index_channels_last(uint64_t offset, uint64_t in_channels,
                                                         uint64_t kernel_h, uint64_t kernel_w) {
  const uint64_t c = offset % in_channels;
  uint64_t rest = offset / in_channels;
  const uint64_t x = rest % kernel_w;
  rest /= kernel_w;
  const uint64_t y = rest % kernel_h;
  const uint64_t o = rest / kernel_h;
  return ((o * in_channels + c) * kernel_h + y) * kernel_w + x;
}

// Where W is a channels_last filter the draw's index is mapped back to the logical one;
// otherwise a memory offset is the logical index.
struct DrawIndex {
  bool channels_last = false;
  uint64_t in_channels = 1, kernel_h = 1, kernel_w = 1;
  FASTFA_HOST_DEVICE uint64_t operator()(int64_t offset) const {
    return channels_last ? logical_index_channels_last(static_cast<uint64_t>(offset), in_channels,
                                                       kernel_h, kernel_w)
                         : static_cast<uint64_t>(offset);
  }
};

// sign(0) = 0 (learning-rules.md); NaN stays NaN, as backprop would propagate it.
// Written as selects, not branches: W's signs are random, so a branch would mispredict
// half the time, and selects let the compiler vectorise the CPU loop.
template <typename T>
FASTFA_HOST_DEVICE T sign_of(T w) {
  T sign = w > T(0) ? T(1) : T(0);
  sign = w < T(0) ? T(-1) : sign;
  return w != w ? w : sign;
}

template <typename T>
FASTFA_HOST_DEVICE T magnitude(T x) {
  return x < T(0) ? -x : x;
}

// The feedback weight B for one element: w is W's entry, r the stored R's entry
// (fa, frsf), xi the unit draw (brsf; fa without stored R). T is the op-math type
// (double for fp64, float otherwise), so half and bfloat16 round once, at the store,
// and fp64 stays exact.
template <typename T>
FASTFA_HOST_DEVICE T feedback_transform(Rule rule, T w, T r, T xi, T scale) {
  switch (rule) {
  case Rule::kBackprop:
    return w;
  case Rule::kFeedbackAlignment:
    return r;
  case Rule::kUniformSignSymmetry:
    return scale * sign_of(w);
  case Rule::kBatchRandomSignFeedback:
    return scale * magnitude(xi) * sign_of(w);
  case Rule::kFixedRandomSignFeedback:
    return magnitude(r) * sign_of(w);
  default: // the estimated rules send the error back through their stored B
    return r;
  }
}

} // namespace fastfa
