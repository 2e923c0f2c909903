// usf's grad_input for a weight-bound convolution on the CPU, with sign(W) never materialised.
//
// Where M = N * Ho * Wo is small against W (resnet18's layer4 at 2x2: M = 16 rows against a
// 512 x 4608 filter), the general path's B = sign(W) (a read of W and a write of B) and oneDNN's
// reorder of B (another read and write) cost about what grad_input's GEMM does. Here one pass reads W:
//   grad_cols[m, n] = sum_k delta[m, k] * sign(W[k, n]),   n = (c_in, kh, kw)
// A register-blocked kernel walks W a strip of one vector's columns at a time: per row of W, one
// load, sign and square (usf's rms scale) feed kRows FMAs with delta's rows, so sign(W) is never
// stored, not even packed. Each task then folds its own input channels' columns into grad_input
// (col2im, conv_taps.h's, which small_conv.cpp's transposed convolution shares). The kernel is
// written once over vector traits and built for AVX-512 and AVX2, picked at run time (cpu_isa). On this Zen 4 (benchmarks/results/2026-12-02-cpu-sign-conv-avx512.md) it halves
// the time of the packed design it replaces (sign(W) packed into a cache-resident buffer, then an
// AVX2 4 x 24 tile): the packing's stores and reloads cost as much as the FMAs.
#include "clones.h"
#include "conv_taps.h"
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if FASTFA_HAS_ISA_KERNELS
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string_view>
#include <type_traits>

namespace fastfa {
namespace {

// The vector traits S: V holds kLanes scalars, the kernel's block is kRows rows of delta by one V of
// columns (kRows accumulators), Mask selects a tail's lanes. sign(V) is feedback.h's sign_of lane by
// lane, bit for bit (NaN stays NaN, +-0 gives +0); sum(V) adds the lanes in double.
//   Avx512:   16 rows (resnet18's M = 16 in one block, so each element of W is signed once): 16
//             accumulators of the 32 zmm registers, sign in one instruction (vfixupimm).
//   Avx2:     8 rows, 8 of the 16 ymm registers (the sign's temporaries need the rest).
// Without either (another CPU or compiler), sign_conv_grad_input_applies is false: B = sign(W) and
// oneDNN / ATen, which vectorise, beat a scalar walk down W's columns (30x slower than AVX2 here).
// GCC does not contract a * b + c under -std=c++20, hence the intrinsics' fma.
#if FASTFA_HAS_ISA_KERNELS
#define FASTFA_AVX2 __attribute__((target("avx2,fma")))
template <typename scalar_t>
struct Avx2;

template <>
struct Avx2<double> {
  using V = __m256d;
  using Mask = __m256i;
  static constexpr int64_t kLanes = 4, kRows = 8;
  FASTFA_AVX2 static V zero() { return _mm256_setzero_pd(); }
  FASTFA_AVX2 static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  FASTFA_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  FASTFA_AVX2 static V add(V a, V b) { return _mm256_add_pd(a, b); }
  FASTFA_AVX2 static V load(const double* p) { return _mm256_loadu_pd(p); }
  FASTFA_AVX2 static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  // Lane j on where j < lanes.
  FASTFA_AVX2 static Mask mask(int64_t lanes) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(lanes), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  FASTFA_AVX2 static V load(const double* p, Mask m) { return _mm256_maskload_pd(p, m); }
  FASTFA_AVX2 static void store(double* p, V v, Mask m) { _mm256_maskstore_pd(p, m, v); }
  // +-1 with w's sign bit where w != 0 (unordered: NaN too), +0 where w == +-0; then NaN lanes back to w.
  FASTFA_AVX2 static V sign(V w) {
    const V unit = _mm256_or_pd(_mm256_and_pd(w, _mm256_set1_pd(-0.0)), _mm256_set1_pd(1.0));
    const V nonzero = _mm256_and_pd(unit, _mm256_cmp_pd(w, _mm256_setzero_pd(), _CMP_NEQ_UQ));
    return _mm256_blendv_pd(nonzero, w, _mm256_cmp_pd(w, w, _CMP_UNORD_Q));
  }
  FASTFA_AVX2 static double sum(V v) {
    const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
  }
};
template <>
struct Avx2<float> {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int64_t kLanes = 8, kRows = 8;
  FASTFA_AVX2 static V zero() { return _mm256_setzero_ps(); }
  FASTFA_AVX2 static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  FASTFA_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  FASTFA_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  FASTFA_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  FASTFA_AVX2 static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  FASTFA_AVX2 static Mask mask(int64_t lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  FASTFA_AVX2 static V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  FASTFA_AVX2 static void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  FASTFA_AVX2 static V sign(V w) {
    const V unit = _mm256_or_ps(_mm256_and_ps(w, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(1.0f));
    const V nonzero = _mm256_and_ps(unit, _mm256_cmp_ps(w, _mm256_setzero_ps(), _CMP_NEQ_UQ));
    return _mm256_blendv_ps(nonzero, w, _mm256_cmp_ps(w, w, _CMP_UNORD_Q));
  }
  // The lanes added in double.
  FASTFA_AVX2 static double sum(V v) {
    return Avx2<double>::sum(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  }
};

#undef FASTFA_AVX2

#define FASTFA_AVX512 __attribute__((target("avx512f,avx2,fma")))
// vfixupimm maps each class of w to a result, 4 bits per class (QNaN, SNaN, +-0, +1, -inf, +inf,
// < 0, > 0): w itself for NaN, +0, +1, -1, +1, -1, +1: sign_of in one instruction.
constexpr int kSignFixup = 0xA9A9A811;

template <typename scalar_t>
struct Avx512;

template <>
struct Avx512<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int64_t kLanes = 8, kRows = 16;
  FASTFA_AVX512 static V zero() { return _mm512_setzero_pd(); }
  FASTFA_AVX512 static V broadcast(const double* p) { return _mm512_set1_pd(*p); }
  FASTFA_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  FASTFA_AVX512 static V add(V a, V b) { return _mm512_add_pd(a, b); }
  FASTFA_AVX512 static V load(const double* p) { return _mm512_loadu_pd(p); }
  FASTFA_AVX512 static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  FASTFA_AVX512 static Mask mask(int64_t lanes) { return static_cast<Mask>((uint32_t(1) << lanes) - 1); }
  FASTFA_AVX512 static V load(const double* p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
  FASTFA_AVX512 static void store(double* p, V v, Mask m) { _mm512_mask_storeu_pd(p, m, v); }
  // The table is read from each 64-bit lane's low half.
  FASTFA_AVX512 static V sign(V w) { return _mm512_fixupimm_pd(w, w, _mm512_set1_epi64(kSignFixup), 0); }
  // By hand and zero-masked: _mm512_reduce_add_pd and the 512 -> 256 casts start from an undefined
  // vector, which GCC 12 warns of (-Wuninitialized).
  FASTFA_AVX512 static double sum(V v) {
    const __m256d half = _mm256_add_pd(_mm512_maskz_extractf64x4_pd(0xF, v, 0), _mm512_maskz_extractf64x4_pd(0xF, v, 1));
    const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(half), _mm256_extractf128_pd(half, 1));
    return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
  }
};

template <>
struct Avx512<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16, kRows = 16;
  FASTFA_AVX512 static V zero() { return _mm512_setzero_ps(); }
  FASTFA_AVX512 static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  FASTFA_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  FASTFA_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  FASTFA_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  FASTFA_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  FASTFA_AVX512 static Mask mask(int64_t lanes) { return static_cast<Mask>((uint32_t(1) << lanes) - 1); }
  FASTFA_AVX512 static V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  FASTFA_AVX512 static void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  FASTFA_AVX512 static V sign(V w) { return _mm512_fixupimm_ps(w, w, _mm512_set1_epi32(kSignFixup), 0); }
  // Zero-masked, as in Avx512<double>::sum.
  FASTFA_AVX512 static double sum(V v) {
    const __m256 low = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(v), 0));
    const __m256 high = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(v), 1));
    return Avx512<double>::sum(_mm512_add_pd(_mm512_maskz_cvtps_pd(0xFF, low), _mm512_maskz_cvtps_pd(0xFF, high)));
  }
};
#undef FASTFA_AVX512
#endif

// delta's K-panel: kPanelK of its rows (8 KiB at M = 16 fp32) stay in L1 while the strips of W
// stream past.
constexpr int64_t kPanelK = 128;

// The kernel is only ever inlined into the per-ISA wrappers below (FASTFA_ISA_KERNEL), where the
// vectors stay in registers: GCC's note that a vector passed by value changes the ABI across ISAs
// does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// c[r, j] (+)= sum_k a[k, r] * sign(w[k, j]) for kRows rows and one vector's columns j < `columns`
// (<= kLanes; a tail loads and stores masked, so a task writes none of the next task's columns); a is
// delta packed k-major (row stride lda), w the strip of W in place (row stride ldw). One load, sign
// and square per k feed kRows FMAs. W is cold (the rest of a step evicts it) and read down a
// column, a cache line or two a row, so each row prefetches the line that ends the next strip
// (prefetch_next; where W's rows are not line-aligned, the strip's other line is this one's).
// Returns the sum of w^2 over the strip in double: fp32 squares in lanes (at most kPanelK a lane,
// ~1e-5 relative at worst), the lanes added in double. An fp32 square can overflow or underflow
// where the double sum would not: such a strip (its sum not finite or below 2^-100) is summed again
// in double.
template <class S, typename scalar_t>
double multiply_signs(const scalar_t* __restrict__ a, int64_t lda, const scalar_t* __restrict__ w, int64_t ldw,
                      int64_t kc, scalar_t* __restrict__ c, int64_t ldc, int64_t columns, bool accumulate,
                      bool prefetch_next) {
  using V = typename S::V;
  constexpr int64_t kR = S::kRows, kL = S::kLanes;
  const typename S::Mask mask = S::mask(columns);
  V acc[kR];
#pragma GCC unroll 16
  for (int64_t r = 0; r < kR; ++r) acc[r] = S::zero();
  V squares = S::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* wk = w + k * ldw;
    if (prefetch_next) __builtin_prefetch(wk + 2 * kL - 1, /*rw=*/0, /*locality=*/3);
    const V wv = columns == kL ? S::load(wk) : S::load(wk, mask);
    squares = S::fma(wv, wv, squares);
    const V sv = S::sign(wv);
    const scalar_t* ak = a + k * lda;
#pragma GCC unroll 16
    for (int64_t r = 0; r < kR; ++r) acc[r] = S::fma(S::broadcast(ak + r), sv, acc[r]);
  }
#pragma GCC unroll 16
  for (int64_t r = 0; r < kR; ++r) {
    scalar_t* out = c + r * ldc;
    if (columns == kL) {
      S::store(out, accumulate ? S::add(S::load(out), acc[r]) : acc[r]);
    } else {
      S::store(out, accumulate ? S::add(S::load(out, mask), acc[r]) : acc[r], mask);
    }
  }
  double sum = S::sum(squares);
  if (std::is_same_v<scalar_t, float> && !(sum >= 0x1p-100 && sum <= std::numeric_limits<float>::max())) {
    sum = 0.0;
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t j = 0; j < columns; ++j) {
        const double x = w[k * ldw + j];
        sum += x * x;
      }
    }
  }
  return sum;
}

#pragma GCC diagnostic pop

#if FASTFA_HAS_ISA_KERNELS
// The kernel per ISA: each wrapper carries its ISA's target, the body is flattened into it.
template <typename scalar_t>
FASTFA_ISA_KERNEL("avx2,fma")
double multiply_signs_avx2(const scalar_t* a, int64_t lda, const scalar_t* w, int64_t ldw, int64_t kc, scalar_t* c,
                           int64_t ldc, int64_t columns, bool accumulate, bool prefetch_next) {
  return multiply_signs<Avx2<scalar_t>>(a, lda, w, ldw, kc, c, ldc, columns, accumulate, prefetch_next);
}
template <typename scalar_t>
FASTFA_ISA_KERNEL("avx512f,avx2,fma")
double multiply_signs_avx512(const scalar_t* a, int64_t lda, const scalar_t* w, int64_t ldw, int64_t kc, scalar_t* c,
                             int64_t ldc, int64_t columns, bool accumulate, bool prefetch_next) {
  return multiply_signs<Avx512<scalar_t>>(a, lda, w, ldw, kc, c, ldc, columns, accumulate, prefetch_next);
}
#endif

template <typename scalar_t>
using StripFn = double (*)(const scalar_t*, int64_t, const scalar_t*, int64_t, int64_t, scalar_t*, int64_t, int64_t,
                           bool, bool);

enum class Isa { kNone, kAvx2, kAvx512 };

// The widest kernel this CPU runs, read once. FASTFA_CPU_ISA=avx2 caps it and =none turns the kernel
// off (the general path), so that the tests can run those on a CPU that has AVX-512.
Isa cpu_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("FASTFA_CPU_ISA");
    const std::string_view cap = env == nullptr ? "" : env;
    TORCH_CHECK(cap.empty() || cap == "avx2" || cap == "none", "FASTFA_CPU_ISA must be avx2 or none, got '", cap,
                "'");
#if FASTFA_HAS_ISA_KERNELS
    if (cap.empty() && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (cap != "none" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kNone;
  }();
  return isa;
}

// S names the strip's shape (kRows rows by kLanes columns); multiply is S's kernel (its ISA's wrapper).
template <class S, typename scalar_t>
at::Tensor grad_input_kernel(StripFn<scalar_t> multiply, const at::Tensor& delta, const at::Tensor& weight,
                             at::IntArrayRef input_sizes, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, double scale) {
  constexpr int64_t kRows = S::kRows, kL = S::kLanes;
  const int64_t batch = delta.size(0), k_total = delta.size(1), out_h = delta.size(2), out_w = delta.size(3);
  const int64_t in_channels = weight.size(1), kernel_h = weight.size(2), kernel_w = weight.size(3);
  const int64_t in_h = input_sizes[2], in_w = input_sizes[3];
  const int64_t spatial = out_h * out_w, rows = batch * spatial;
  const int64_t padded_rows = (rows + kRows - 1) / kRows * kRows;
  const int64_t taps = kernel_h * kernel_w, columns = in_channels * taps;

  // Buffers per call, freed on return: delta packed and grad_cols (64 / K of W's size at the most).
  // Kept between calls they would stay for the process's life, sized by the largest layer; per call
  // they cost no measurable time (benchmarks/results/2026-12-02-cpu-sign-conv-tidy.md).
  // delta as [K][rows] (row m = (b, ho, wo)), rows padded with zeros to whole row blocks.
  const at::Tensor workspace = at::empty({k_total * padded_rows + padded_rows * columns}, delta.options());
  scalar_t* a = workspace.mutable_data_ptr<scalar_t>();
  scalar_t* cols = a + k_total * padded_rows;
  {
    const at::Tensor d = delta.contiguous();
    const scalar_t* src = d.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < k_total; ++k) {
      scalar_t* dst = a + k * padded_rows;
      for (int64_t b = 0; b < batch; ++b) {
        std::copy_n(src + (b * k_total + k) * spatial, spatial, dst + b * spatial);
      }
      std::fill(dst + rows, dst + padded_rows, scalar_t(0));
    }
  }

  at::Tensor grad_input = at::empty(input_sizes, delta.options());
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const ConvTaps plane_taps(in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride, padding, dilation);

  // Tasks own whole input channels, so each folds its own columns with no other task writing
  // there. About 1024 columns per task at least: a smaller share does not pay the hand-off.
  const int64_t grain = std::max<int64_t>(1, 1024 / taps);
  const double sum_of_squares = at::parallel_reduce(
      0, in_channels, grain, 0.0,
      [&](int64_t c_begin, int64_t c_end, double partial) {
        // K-panels outermost, so delta's panel stays in L1; within a panel, strip after strip of W's
        // columns, each strip's rows of W read once (for every row block at M > kRows, from cache).
        const int64_t n_end = c_end * taps;
        for (int64_t k0 = 0; k0 < k_total; k0 += kPanelK) {
          const int64_t kc = std::min(kPanelK, k_total - k0);
          for (int64_t n = c_begin * taps; n < n_end; n += kL) {
            const int64_t strip = std::min(kL, n_end - n);
            for (int64_t r0 = 0; r0 < padded_rows; r0 += kRows) {
              const double squares = multiply(a + k0 * padded_rows + r0, padded_rows, w + k0 * columns + n, columns, kc,
                                              cols + r0 * columns + n, columns, strip, /*accumulate=*/k0 > 0,
                                              /*prefetch_next=*/r0 == 0 && n + 2 * kL <= columns);
              if (r0 == 0) partial += squares;
            }
          }
        }
        // col2im: grad_input[b, c, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw] += cols[(b, ho, wo), (c, kh, kw)]
        for (int64_t b = 0; b < batch; ++b) {
          scalar_t* planes = gi + b * in_channels * in_h * in_w;
          std::fill(planes + c_begin * in_h * in_w, planes + c_end * in_h * in_w, scalar_t(0));
          fold_into(plane_taps, c_begin, c_end, cols + b * spatial * columns, /*tap_stride=*/1,
                    /*position_stride=*/columns, planes);
        }
        return partial;
      },
      std::plus<double>());
  // usf's s on grad_input, as the general path defers it (fp32 / fp64).
  const double factor =
      scale_from_weight(Rule::kUniformSignSymmetry, scale)
          ? std::sqrt(sum_of_squares / static_cast<double>(weight.numel()))
          : scale;
  if (factor != 1.0) grad_input.mul_(factor);
  return grad_input;
}

} // namespace

bool sign_conv_grad_input_applies(const at::Tensor& delta, const at::Tensor& input, const at::Tensor& weight,
                                  int64_t groups, int64_t rule) {
  // Measured on resnet18's layer4 filters (2.4M and 1.2M elements at M = 16): see
  // benchmarks/results/2026-12-01-cpu-resnet18-usf.md. Below, the general path's B stays in cache
  // for oneDNN's reorder and costs about what this saves.
  constexpr int64_t kMaxRows = 64;
  constexpr int64_t kMinWeight = int64_t(1) << 20;
  const auto dtype = weight.scalar_type();
  // grad_input comes back NCHW-contiguous: a channels_last input keeps the general path's layout.
  return static_cast<Rule>(rule) == Rule::kUniformSignSymmetry && weight.is_cpu() && delta.is_cpu() &&
         groups == 1 && input.suggest_memory_format() == at::MemoryFormat::Contiguous &&
         (dtype == at::kFloat || dtype == at::kDouble) && delta.scalar_type() == dtype &&
         weight.dim() == 4 && weight.is_contiguous() && weight.numel() >= kMinWeight && delta.numel() > 0 &&
         delta.size(0) * delta.size(2) * delta.size(3) <= kMaxRows && cpu_isa() != Isa::kNone;
}

at::Tensor sign_conv_grad_input_cpu(const at::Tensor& delta, const at::Tensor& weight, at::IntArrayRef input_sizes,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    double scale) {
  at::Tensor grad_input;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sign_conv_grad_input_cpu", [&] {
    switch (cpu_isa()) {
#if FASTFA_HAS_ISA_KERNELS
    case Isa::kAvx512:
      grad_input = grad_input_kernel<Avx512<scalar_t>>(multiply_signs_avx512<scalar_t>, delta, weight, input_sizes,
                                                       stride, padding, dilation, scale);
      break;
    case Isa::kAvx2:
      grad_input = grad_input_kernel<Avx2<scalar_t>>(multiply_signs_avx2<scalar_t>, delta, weight, input_sizes, stride,
                                                     padding, dilation, scale);
      break;
#endif
    default:
      TORCH_INTERNAL_ASSERT(false, "sign_conv_grad_input_cpu without a vector kernel (its applies() is false there)");
    }
  });
  return grad_input;
}

} // namespace fastfa
