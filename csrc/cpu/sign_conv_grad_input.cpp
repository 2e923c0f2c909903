// usf's grad_input for a weight-bound convolution on the CPU, with sign(W) never materialised.
//
// Where M = N * Ho * Wo is small against W (resnet18's layer4 at 2x2: M = 16 rows against a
// 512 x 4608 filter), grad_input's GEMM is bound by reading W. The general path writes
// B = sign(W) (a read of W and a write of B) and oneDNN then reorders B (another read and write):
// three W-sized passes more than the GEMM's own read. Here one pass reads W:
//   grad_cols[m, n] = sum_k delta[m, k] * sign(W[k, n]),   n = (c_in, kh, kw)
// sign(W) is packed a (K-panel x column-panel) block at a time into a cache-resident buffer, the
// same pass sums w^2 for usf's rms scale, a register-blocked micro-kernel multiplies delta's rows
// into the block, and each task folds its own input channels' columns into grad_input (col2im,
// conv_taps.h's, which small_conv.cpp's transposed convolution shares).
#include "clones.h"
#include "conv_taps.h"
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if FASTFA_HAS_AVX2_FMA_KERNELS
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <functional>

namespace fastfa {
namespace {

// Micro-tile: kRows rows of delta by kVectors AVX2 vectors of columns (12 accumulators of the 16
// ymm registers). Four rows, so resnet18's M = 16 pads no row; three vectors, so 4608 and 2304
// columns split into whole tiles in fp32.
constexpr int64_t kRows = 4;
constexpr int64_t kVectors = 3;
template <typename scalar_t>
constexpr int64_t kLanes = 32 / static_cast<int64_t>(sizeof(scalar_t));
template <typename scalar_t>
constexpr int64_t kTileColumns = kVectors * kLanes<scalar_t>;
// A K-panel of the packed block: kPanelK rows of W by kPanelTiles tiles (fp32: 128 x 192, 96 KiB,
// in L2; one tile's 12 KiB and delta's K-panel, 8 KiB at M = 16, stay in L1 across the row blocks).
constexpr int64_t kPanelK = 128;
constexpr int64_t kPanelTiles = 8;

// One tile's row: sign(row[j]) into out[j] and w^2 into lanes[j] for j < kT, the columns from
// `columns` on zero. A whole tile (kWhole) reads no bound, so its loop vectorises unmasked.
template <bool kWhole, typename scalar_t>
inline void pack_tile_row(const scalar_t* __restrict__ row, int64_t columns, scalar_t* __restrict__ out,
                          double* __restrict__ lanes) {
  for (int64_t j = 0; j < kTileColumns<scalar_t>; ++j) {
    const scalar_t w = kWhole || j < columns ? row[j] : scalar_t(0);
    lanes[j] += static_cast<double>(w) * static_cast<double>(w);
    out[j] = sign_of(w);
  }
}

// sign(W[k0 : k0 + kc, n0 : n0 + nc]) into packed[tile][k][column], columns past nc zero, and
// the sum of w^2 over the block (in double, one lane per column so the loop vectorises).
// sign_of is feedback_transform's: NaN stays NaN, +-0 gives 0.
template <typename scalar_t>
FASTFA_AVX2_CLONES
double pack_signs(const scalar_t* __restrict__ weight, int64_t ldw, int64_t kc, int64_t nc,
                  scalar_t* __restrict__ packed) {
  constexpr int64_t kT = kTileColumns<scalar_t>;
  double lanes[kT] = {};
  const int64_t tiles = (nc + kT - 1) / kT;
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* row = weight + k * ldw;
    for (int64_t t = 0; t < tiles; ++t) {
      scalar_t* out = packed + (t * kc + k) * kT;
      const int64_t columns = std::min(kT, nc - t * kT);
      if (columns == kT) {
        pack_tile_row<true>(row + t * kT, columns, out, lanes);
      } else {
        pack_tile_row<false>(row + t * kT, columns, out, lanes);
      }
    }
  }
  double sum = 0.0;
  for (const double lane : lanes) sum += lane;
  return sum;
}

// c[r, j] (+)= sum_k a[k, r] * b[k, j] for kRows rows and one tile's columns; a is delta packed
// k-major (row stride lda), b one packed tile. Only `columns` of the tile are stored: past a task's
// last tail the columns are the next task's, written at the same time. The packed tile is zero
// there, so a tail differs from a whole tile in its store alone.
template <typename scalar_t>
void tile_portable(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t kc, scalar_t* c, int64_t ldc,
                   int64_t columns, bool accumulate) {
  constexpr int64_t kT = kTileColumns<scalar_t>;
  scalar_t acc[kRows][kT] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t r = 0; r < kRows; ++r) {
      const scalar_t x = a[k * lda + r];
      for (int64_t j = 0; j < kT; ++j) acc[r][j] += x * b[k * kT + j];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < columns; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + acc[r][j] : acc[r][j];
  }
}

#if FASTFA_HAS_AVX2_FMA_KERNELS
// The AVX2 + FMA tile: per k, three vector loads of the tile and four broadcasts of delta feed
// twelve FMAs. GCC does not contract a * b + c under -std=c++17, hence the intrinsics.
// The main tile and its tails share one store loop: a whole vector moves plain, a tail's last
// vectors masked (slower moves, in a tail only).
template <typename scalar_t>
struct Avx2;

template <>
struct Avx2<float> {
  using V = __m256;
  __attribute__((target("avx2,fma"))) static V zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static V add(V a, V b) { return _mm256_add_ps(a, b); }
  __attribute__((target("avx2,fma"))) static V load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2,fma"))) static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  __attribute__((target("avx2,fma"))) static V load(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  __attribute__((target("avx2,fma"))) static void store(float* p, V v, __m256i m) { _mm256_maskstore_ps(p, m, v); }
  // Lane j on where j < lanes.
  __attribute__((target("avx2,fma"))) static __m256i mask(int64_t lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

template <>
struct Avx2<double> {
  using V = __m256d;
  __attribute__((target("avx2,fma"))) static V zero() { return _mm256_setzero_pd(); }
  __attribute__((target("avx2,fma"))) static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  __attribute__((target("avx2,fma"))) static V add(V a, V b) { return _mm256_add_pd(a, b); }
  __attribute__((target("avx2,fma"))) static V load(const double* p) { return _mm256_loadu_pd(p); }
  __attribute__((target("avx2,fma"))) static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  __attribute__((target("avx2,fma"))) static V load(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  __attribute__((target("avx2,fma"))) static void store(double* p, V v, __m256i m) { _mm256_maskstore_pd(p, m, v); }
  __attribute__((target("avx2,fma"))) static __m256i mask(int64_t lanes) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(lanes), _mm256_setr_epi64x(0, 1, 2, 3));
  }
};

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void tile_avx2(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t kc,
                                                   scalar_t* c, int64_t ldc, int64_t columns, bool accumulate) {
  static_assert(kRows == 4 && kVectors == 3, "tile_avx2 names its twelve accumulators");
  using S = Avx2<scalar_t>;
  using V = typename S::V;
  constexpr int64_t kL = kLanes<scalar_t>;
  constexpr int64_t kT = kTileColumns<scalar_t>;
  // Twelve named registers: as an array, GCC stores the accumulators back to the stack every k.
  V c00 = S::zero(), c01 = S::zero(), c02 = S::zero(), c10 = S::zero(), c11 = S::zero(), c12 = S::zero();
  V c20 = S::zero(), c21 = S::zero(), c22 = S::zero(), c30 = S::zero(), c31 = S::zero(), c32 = S::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* bk = b + k * kT;
    const scalar_t* ak = a + k * lda;
    const V b0 = S::load(bk), b1 = S::load(bk + kL), b2 = S::load(bk + 2 * kL);
    V x = S::broadcast(ak);
    c00 = S::fma(x, b0, c00), c01 = S::fma(x, b1, c01), c02 = S::fma(x, b2, c02);
    x = S::broadcast(ak + 1);
    c10 = S::fma(x, b0, c10), c11 = S::fma(x, b1, c11), c12 = S::fma(x, b2, c12);
    x = S::broadcast(ak + 2);
    c20 = S::fma(x, b0, c20), c21 = S::fma(x, b1, c21), c22 = S::fma(x, b2, c22);
    x = S::broadcast(ak + 3);
    c30 = S::fma(x, b0, c30), c31 = S::fma(x, b1, c31), c32 = S::fma(x, b2, c32);
  }
  const V rows[kRows][kVectors] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int64_t v = 0; v < kVectors; ++v) {
    const int64_t lanes = std::clamp(columns - v * kL, int64_t(0), kL);
    const __m256i mask = S::mask(lanes);
    for (int64_t r = 0; r < kRows; ++r) {
      scalar_t* out = c + r * ldc + v * kL;
      if (lanes == kL) {
        S::store(out, accumulate ? S::add(S::load(out), rows[r][v]) : rows[r][v]);
      } else {
        S::store(out, accumulate ? S::add(S::load(out, mask), rows[r][v]) : rows[r][v], mask);
      }
    }
  }
}
#endif

template <typename scalar_t>
using TileKernel = void (*)(const scalar_t*, int64_t, const scalar_t*, int64_t, scalar_t*, int64_t, int64_t, bool);

template <typename scalar_t>
TileKernel<scalar_t> tile_kernel() {
#if FASTFA_HAS_AVX2_FMA_KERNELS
  static const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2_fma) return tile_avx2<scalar_t>;
#endif
  return tile_portable<scalar_t>;
}

template <typename scalar_t>
at::Tensor grad_input_kernel(const at::Tensor& delta, const at::Tensor& weight, at::IntArrayRef input_sizes,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             double scale) {
  const int64_t batch = delta.size(0), k_total = delta.size(1), out_h = delta.size(2), out_w = delta.size(3);
  const int64_t in_channels = weight.size(1), kernel_h = weight.size(2), kernel_w = weight.size(3);
  const int64_t in_h = input_sizes[2], in_w = input_sizes[3];
  const int64_t spatial = out_h * out_w, rows = batch * spatial;
  const int64_t padded_rows = (rows + kRows - 1) / kRows * kRows;
  const int64_t taps = kernel_h * kernel_w, columns = in_channels * taps;
  constexpr int64_t kT = kTileColumns<scalar_t>;

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
  const TileKernel<scalar_t> tile = tile_kernel<scalar_t>();
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
            partial += pack_signs(w + k0 * columns + n0, columns, kc, nc, packed);
            for (int64_t t = 0; t < tiles; ++t) {
              const int64_t tile_columns = std::min(kT, nc - t * kT);
              for (int64_t r0 = 0; r0 < padded_rows; r0 += kRows) {
                tile(a + k0 * padded_rows + r0, padded_rows, packed + t * kc * kT, kc,
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
    grad_input = grad_input_kernel<scalar_t>(delta, weight, input_sizes, stride, padding, dilation, scale);
  });
  return grad_input;
}

} // namespace fastfa
