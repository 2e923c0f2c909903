// usf's grad_input for a weight-bound convolution on the CPU, with sign(W) never materialised.
//
// Where M = N * Ho * Wo is small against W (resnet18's layer4 at 2x2: M = 16 rows against a
// 512 x 4608 filter), the general path's B = sign(W) (a read of W and a write of B) and oneDNN's
// reorder of B (another read and write) cost about what grad_input's GEMM does. Here one pass reads W:
//   grad_cols[m, n] = sum_k delta[m, k] * sign(W[k, n]),   n = (c_in, kh, kw)
// sign(W) is packed a (K-panel x column-panel) block at a time into a cache-resident buffer, the
// same pass sums w^2 for usf's rms scale, a register-blocked micro-kernel multiplies delta's rows
// into the block, and each task folds its own input channels' columns into grad_input (col2im,
// conv_taps.h's, which small_conv.cpp's transposed convolution shares). The packing and the
// micro-kernel are written once over vector traits and built for AVX2 and portable code, picked at
// run time (cpu_isa).
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

// The kernels are written once over an ISA's vector traits S: V holds kLanes scalars; the micro-tile
// is kRows rows of delta by kVectors vectors of columns; Mask selects a tail's lanes. sign(V) is
// feedback.h's sign_of lane by lane, bit for bit (NaN stays NaN, +-0 gives +0).
//   Avx2:     4 rows x 3 vectors, 12 accumulators of the 16 ymm registers (four rows, so resnet18's
//             M = 16 pads no row; three vectors, so 4608 and 2304 columns split into whole tiles).
//   Portable: one scalar a "vector", 4 rows x 8 columns.
// An AVX-512 tile (8 rows x 3 zmm) was measured on this Zen 4 and lost to AVX2: Zen 4 runs a zmm FMA
// as two ymm halves, so the FMA rate is the same, and the packing only got slower
// (benchmarks/results/2026-12-02-cpu-sign-conv-avx512.md).
// GCC does not contract a * b + c under -std=c++20, hence the intrinsics' fma.
template <typename scalar_t>
struct Portable {
  using V = scalar_t;
  using Mask = bool;
  static constexpr int64_t kLanes = 1, kRows = 4, kVectors = 8;
  static V zero() { return scalar_t(0); }
  static V broadcast(const scalar_t* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V load(const scalar_t* p) { return *p; }
  static void store(scalar_t* p, V v) { *p = v; }
  static Mask mask(int64_t lanes) { return lanes > 0; }
  static V load(const scalar_t* p, Mask m) { return m ? *p : scalar_t(0); }
  static void store(scalar_t* p, V v, Mask m) {
    if (m) *p = v;
  }
  static V sign(V w) { return sign_of(w); }
  static double sum(V v) { return v; }
};

#if FASTFA_HAS_ISA_KERNELS
#define FASTFA_AVX2 __attribute__((target("avx2,fma")))
template <typename scalar_t>
struct Avx2;

template <>
struct Avx2<double> {
  using V = __m256d;
  using Mask = __m256i;
  static constexpr int64_t kLanes = 4, kRows = 4, kVectors = 3;
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
  static constexpr int64_t kLanes = 8, kRows = 4, kVectors = 3;
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

#endif

template <class S>
constexpr int64_t kTileColumns = S::kLanes * S::kVectors;
// A K-panel of the packed block: kPanelK rows of W by kPanelTiles tiles (AVX2: 64 x 192 fp32,
// 48 KiB, in L2). One tile (6 KiB) and delta's K-panel (4 KiB at M = 16) stay in L1 across the
// tile's row blocks, those of both threads on a core's two SMT siblings too (128 rows: 12 + 8 KiB
// each, and two threads ran slower).
constexpr int64_t kPanelK = 64;
constexpr int64_t kPanelTiles = 8;
// The packing reads W from DRAM (it is cold after the rest of a step) a row segment of 768 bytes at
// a time, too short for the hardware prefetcher to run ahead: it prefetches the row kPrefetchRows
// below (beyond the K-panel that is the next panel's, packed next).
constexpr int64_t kPrefetchRows = 4;

// The bodies are only ever inlined into the per-ISA wrappers below (FASTFA_ISA_KERNEL), where
// the vectors stay in registers: GCC's note that a vector passed by value changes the ABI across
// ISAs does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// One tile's row: sign(row[j]) into out[j] for the tile's columns, zero from `columns` on, and w^2
// added into squares, one accumulator a vector (one would chain every FMA on the last). A whole
// tile (kWhole) loads unmasked.
template <class S, bool kWhole, typename scalar_t>
inline void pack_tile_row(const scalar_t* __restrict__ row, int64_t columns, scalar_t* __restrict__ out,
                          typename S::V (&squares)[S::kVectors]) {
  constexpr int64_t kL = S::kLanes;
#pragma GCC unroll 8
  for (int64_t v = 0; v < S::kVectors; ++v) {
    const int64_t lanes = kWhole ? kL : std::clamp(columns - v * kL, int64_t(0), kL);
    const typename S::V w = lanes == kL ? S::load(row + v * kL) : S::load(row + v * kL, S::mask(lanes));
    squares[v] = S::fma(w, w, squares[v]);
    S::store(out + v * kL, S::sign(w));
  }
}

// sign(W[k0 : k0 + kc, n0 : n0 + nc]) into packed[tile][k][column], columns past nc zero; returns
// the sum of w^2 over the block in double. The squares of one row of W are summed in S's lanes
// (fp32: at most kPanelTiles squares a lane, ~5e-7 relative at worst) and the row's
// lanes in double. An fp32 square can overflow or underflow where the double sum would not: such a
// row (its lanes' sum not finite or below 2^-100) is summed again in double. W has `rows_left`
// rows from k0 on (the prefetch's bound).
template <class S, typename scalar_t>
double pack_signs(const scalar_t* __restrict__ weight, int64_t ldw, int64_t kc, int64_t nc, int64_t rows_left,
                  scalar_t* __restrict__ packed) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kT = kTileColumns<S>;
  const int64_t tiles = (nc + kT - 1) / kT;
  double sum = 0.0;
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* row = weight + k * ldw;
    typename S::V squares[S::kVectors];
#pragma GCC unroll 8
    for (int64_t v = 0; v < S::kVectors; ++v) squares[v] = S::zero();
    for (int64_t t = 0; t < tiles; ++t) {
      scalar_t* out = packed + (t * kc + k) * kT;
      const int64_t columns = std::min(kT, nc - t * kT);
      if (k + kPrefetchRows < rows_left) {
        for (int64_t j = t * kT; j < std::min(nc, (t + 1) * kT); j += kLine) {
          __builtin_prefetch(row + kPrefetchRows * ldw + j, /*rw=*/0, /*locality=*/3);
        }
      }
      if (columns == kT) {
        pack_tile_row<S, true>(row + t * kT, columns, out, squares);
      } else {
        pack_tile_row<S, false>(row + t * kT, columns, out, squares);
      }
    }
#pragma GCC unroll 8
    for (int64_t v = 1; v < S::kVectors; ++v) squares[0] = S::add(squares[0], squares[v]);
    double row_sum = S::sum(squares[0]);
    if (std::is_same_v<scalar_t, float> && !(row_sum >= 0x1p-100 && row_sum <= std::numeric_limits<float>::max())) {
      row_sum = 0.0;
      for (int64_t j = 0; j < nc; ++j) row_sum += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    }
    sum += row_sum;
  }
  return sum;
}

// c[r, j] (+)= sum_k a[k, r] * b[k, j] for kRows rows and one tile's columns; a is delta packed
// k-major (row stride lda), b one packed tile. Only `columns` of the tile are stored: past a task's
// last tail the columns are the next task's, written at the same time. The packed tile is zero
// there, so a tail differs from a whole tile in its store alone: whole vectors move plain, a tail's
// last vectors masked.
template <class S, typename scalar_t>
void multiply_tile(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t kc, scalar_t* c, int64_t ldc,
                   int64_t columns, bool accumulate) {
  using V = typename S::V;
  constexpr int64_t kR = S::kRows, kN = S::kVectors, kL = S::kLanes, kT = kTileColumns<S>;
  // Fully unrolled, the accumulators live in registers (a loop over the array stores them back
  // to the stack every k).
  V acc[kR][kN];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kR; ++r) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < kN; ++v) acc[r][v] = S::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* ak = a + k * lda;
    V bk[kN];
#pragma GCC unroll 8
    for (int64_t v = 0; v < kN; ++v) bk[v] = S::load(b + k * kT + v * kL);
#pragma GCC unroll 8
    for (int64_t r = 0; r < kR; ++r) {
      const V x = S::broadcast(ak + r);
#pragma GCC unroll 8
      for (int64_t v = 0; v < kN; ++v) acc[r][v] = S::fma(x, bk[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int64_t v = 0; v < kN; ++v) {
    const int64_t lanes = std::clamp(columns - v * kL, int64_t(0), kL);
    const typename S::Mask mask = S::mask(lanes);
#pragma GCC unroll 8
    for (int64_t r = 0; r < kR; ++r) {
      scalar_t* out = c + r * ldc + v * kL;
      if (lanes == kL) {
        S::store(out, accumulate ? S::add(S::load(out), acc[r][v]) : acc[r][v]);
      } else {
        S::store(out, accumulate ? S::add(S::load(out, mask), acc[r][v]) : acc[r][v], mask);
      }
    }
  }
}

#pragma GCC diagnostic pop

template <typename scalar_t>
using PackFn = double (*)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, scalar_t*);
template <typename scalar_t>
using TileFn = void (*)(const scalar_t*, int64_t, const scalar_t*, int64_t, scalar_t*, int64_t, int64_t, bool);

#if FASTFA_HAS_ISA_KERNELS
// The kernels per ISA: each wrapper carries its ISA's target, the body is flattened into it.
template <typename scalar_t>
FASTFA_ISA_KERNEL("avx2,fma")
double pack_signs_avx2(const scalar_t* weight, int64_t ldw, int64_t kc, int64_t nc, int64_t rows_left,
                       scalar_t* packed) {
  return pack_signs<Avx2<scalar_t>>(weight, ldw, kc, nc, rows_left, packed);
}
template <typename scalar_t>
FASTFA_ISA_KERNEL("avx2,fma")
void multiply_tile_avx2(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t kc, scalar_t* c, int64_t ldc,
                        int64_t columns, bool accumulate) {
  multiply_tile<Avx2<scalar_t>>(a, lda, b, kc, c, ldc, columns, accumulate);
}
#endif

enum class Isa { kPortable, kAvx2 };

// The kernels this CPU runs, read once. FASTFA_CPU_ISA=portable picks the portable ones on a CPU with
// AVX2, so that the tests can run them.
Isa cpu_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("FASTFA_CPU_ISA");
    const std::string_view cap = env == nullptr ? "" : env;
    TORCH_CHECK(cap.empty() || cap == "avx2" || cap == "portable", "FASTFA_CPU_ISA must be avx2 or portable, got '",
                cap, "'");
#if FASTFA_HAS_ISA_KERNELS
    if (cap != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kPortable;
  }();
  return isa;
}

// S names the tile's shape; pack and multiply are S's kernels (its ISA's wrappers).
template <class S, typename scalar_t>
at::Tensor grad_input_kernel(PackFn<scalar_t> pack, TileFn<scalar_t> multiply, const at::Tensor& delta,
                             const at::Tensor& weight, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, double scale) {
  constexpr int64_t kRows = S::kRows, kT = kTileColumns<S>;
  const int64_t batch = delta.size(0), k_total = delta.size(1), out_h = delta.size(2), out_w = delta.size(3);
  const int64_t in_channels = weight.size(1), kernel_h = weight.size(2), kernel_w = weight.size(3);
  const int64_t in_h = input_sizes[2], in_w = input_sizes[3];
  const int64_t spatial = out_h * out_w, rows = batch * spatial;
  const int64_t padded_rows = (rows + kRows - 1) / kRows * kRows;
  const int64_t taps = kernel_h * kernel_w, columns = in_channels * taps;

  // Buffers per call, freed on return: delta packed, grad_cols (64 / K of W's size at the most) and,
  // per task, one sign panel. Kept between calls they would stay for the process's life, one set
  // per OpenMP thread sized by the largest layer; per call they cost no measurable time
  // (benchmarks/results/2026-12-02-cpu-sign-conv-tidy.md).
  // delta as [K][rows] (row m = (b, ho, wo)), rows padded with zeros to whole micro-tiles.
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
        const at::Tensor panel = at::empty({kPanelK * kPanelTiles * kT}, delta.options());
        scalar_t* packed = panel.mutable_data_ptr<scalar_t>();
        const int64_t n_end = c_end * taps;
        for (int64_t n0 = c_begin * taps; n0 < n_end; n0 += kPanelTiles * kT) {
          const int64_t nc = std::min(kPanelTiles * kT, n_end - n0);
          const int64_t tiles = (nc + kT - 1) / kT;
          for (int64_t k0 = 0; k0 < k_total; k0 += kPanelK) {
            const int64_t kc = std::min(kPanelK, k_total - k0);
            partial += pack(w + k0 * columns + n0, columns, kc, nc, k_total - k0, packed);
            for (int64_t t = 0; t < tiles; ++t) {
              const int64_t tile_columns = std::min(kT, nc - t * kT);
              for (int64_t r0 = 0; r0 < padded_rows; r0 += kRows) {
                multiply(a + k0 * padded_rows + r0, padded_rows, packed + t * kc * kT, kc,
                         cols + r0 * columns + n0 + t * kT, columns, tile_columns, /*accumulate=*/k0 > 0);
              }
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
         delta.size(0) * delta.size(2) * delta.size(3) <= kMaxRows;
}

at::Tensor sign_conv_grad_input_cpu(const at::Tensor& delta, const at::Tensor& weight, at::IntArrayRef input_sizes,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    double scale) {
  at::Tensor grad_input;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sign_conv_grad_input_cpu", [&] {
    switch (cpu_isa()) {
#if FASTFA_HAS_ISA_KERNELS
    case Isa::kAvx2:
      grad_input = grad_input_kernel<Avx2<scalar_t>>(pack_signs_avx2<scalar_t>, multiply_tile_avx2<scalar_t>, delta,
                                                     weight, input_sizes, stride, padding, dilation, scale);
      break;
#endif
    default:
      grad_input = grad_input_kernel<Portable<scalar_t>>(pack_signs<Portable<scalar_t>, scalar_t>,
                                                         multiply_tile<Portable<scalar_t>, scalar_t>, delta, weight,
                                                         input_sizes, stride, padding, dilation, scale);
    }
  });
  return grad_input;
}

} // namespace fastfa
