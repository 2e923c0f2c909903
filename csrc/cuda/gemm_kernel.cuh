// The fused GEMM template of the cuda backend (declared in fastfa/gemm.h).
//
// One kernel, C = A B^T, for every pass of a linear or conv layer and every rule:
//   forward      A = x,        B = W,      epilogue bias + activation
//   grad_input   A = delta,    B = T(W),   the rule's transform applied to B's tiles
//   grad_weight  A = delta^T,  B = x^T,    A's row sums give grad_bias
// (a convolution's operands are the implicit-GEMM views of implicit_gemm.cuh: the loaders
// gather them through an index, nothing is unfolded in memory). The rule enters only through
// the Transform functor, applied to each B element between the global load and the
// shared-memory store; bias, activation and grad_bias ride along in the epilogue / loader.
// Where an operand's elements sit is the loader's Index (a strided matrix here, the conv
// views in implicit_gemm.cuh); where C's go, the Epilogue's. Instantiations live in
// gemm_<dtype>_*.cu, one small file each, so a build with MAX_JOBS cores compiles them in
// parallel. The loaders, indices and epilogues are host-callable too, so that
// tests/cuda/implicit_gemm_check.cu runs the kernel's data path on the CPU.
//
// Data path (both architectures): 256 threads load a 128-row x 128-byte tile of A and of B
// from global memory into registers, transform and round them (bf16 / fp16, or fp32 to
// tf32), and store them K-major into shared memory with the 128-byte swizzle that wgmma
// reads natively (a tile copied as it is goes by cp.async instead, without registers).
// Staging B through registers, rather than TMA, is what lets an arbitrary elementwise
// transform sit in the data path and lets any operand layout (K- or row-contiguous) land in
// the one layout that the MMA reads (tf32 wgmma exists only K-major).
// The pipeline (Arch::kStages shared stages, see gemm_body): tile t + 2 is stored while the
// MMAs of tile t run, and tile t + 3's global loads are in flight across the barrier; on
// sm_90a the wgmmas of a tile complete only at the next tile's wait<1>, so the tensor cores
// always hold a queued tile and never drain at the barrier. The global latency and the
// transform's arithmetic (a Philox draw for brsf) overlap the tensor cores.
//   sm_90a: two warpgroups, each a 64x128 slab with wgmma.m64n128 (SS: both operands from
//           shared memory through matrix descriptors), 64 fp32 accumulators per thread.
//   sm_80+: eight warps in 2x4, each a 64x32 slab with mma.sync.m16n8 fed by ldmatrix.
// Each K step of either MMA consumes 32 bytes of every row (k16 for 16-bit types, k8 for
// tf32), so one 128-byte tile row is four steps for every dtype. The grid: x over C's
// 128-row tiles, y over its 128-column tiles, z over K slices (split-K, for a long K such as
// grad_weight's batch; SplitEpilogue writes each slice's fp32 partial); raster() reorders the
// (x, y) tiles in groups along M, for L2 reuse.
#pragma once

#include "fastfa/feedback.h"
#include "fastfa/gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace fastfa {
namespace gemm {

// The architecture policies; their names appear in the kernels' symbols, which is how
// tests/test_sass.py tells which tensor-core instruction each kernel must contain.
// kStages: shared-memory stages of 32 KiB (A and B tiles); kMmasInFlight: k-tiles whose MMAs
// may still read their stage when a thread reaches the next barrier (mma.sync's ldmatrix
// reads complete in the thread, wgmma's only at warpgroup_wait). Three stages fit the 99 KiB
// of sm_86 / sm_89 as well as sm_80's 163; four fit sm_90's 227 KiB.
struct Sm80Mma {
  static constexpr bool kGmma = false;
  static constexpr int kStages = 3;
  static constexpr int kMmasInFlight = 0;
};
struct Sm90Gmma {
  static constexpr bool kGmma = true;
  static constexpr int kStages = 4;
  static constexpr int kMmasInFlight = 1;
};

namespace detail {

constexpr int kThreads = 256;
constexpr int kTileRows = 128;  // rows of A (M) and of B (N) per CTA
constexpr int kRowBytes = 128;  // bytes of K per tile row: the width of the 128-byte swizzle
constexpr int kTileBytes = kTileRows * kRowBytes;
constexpr int kStageBytes = 2 * kTileBytes;  // A and B
constexpr int kVectorsPerThread = kTileBytes / (16 * kThreads);  // 16-byte vectors: 4

static_assert(kVectorsPerThread == 4, "tile geometry");

// Dynamic shared memory of a kernel: its stages, the row sums and the 1024-byte alignment.
template <class Arch>
constexpr int shared_bytes() {
  return Arch::kStages * kStageBytes + kTileRows * int(sizeof(float)) + 1024;
}
static_assert(shared_bytes<Sm80Mma>() <= 99 * 1024, "sm_86 / sm_89 allow 99 KiB per block");
static_assert(shared_bytes<Sm90Gmma>() <= 227 * 1024, "sm_90 allows 227 KiB per block");
// Tiles ahead of the one the MMAs read that the loop keeps stored: a stage is refilled only
// once no MMA can still read it (Arch::kMmasInFlight), so two with either policy.
template <class Arch>
constexpr int tiles_ahead() {
  return Arch::kStages - 1 - Arch::kMmasInFlight;
}

// Byte offset of (row, byte) in a K-major tile with the 128-byte swizzle (Swizzle<3,4,3>):
// the 16-byte chunk index is XORed with row % 8, so the eight rows of a core matrix hit
// distinct banks, for ldmatrix and for wgmma's descriptors (layout type SWIZZLE_128B).
__host__ __device__ __forceinline__ uint32_t swizzled(uint32_t row, uint32_t byte) {
  const uint32_t offset = row * kRowBytes + byte;
  return offset ^ ((offset >> 3) & 0x70u);
}

// Byte offset of (row, k) in an MN-major tile of 16-bit elements with the 128-byte swizzle
// (CuTe's GMMA::Layout_MN_SW128_Atom tiled rows first): atoms of 64 rows x 8 k, each k one
// swizzled 128-byte line of 64 rows; the two atoms along rows 1024 bytes apart, each group of
// 8 k 2048 bytes further. A vector of 8 rows at one k is 16 contiguous bytes.
__host__ __device__ __forceinline__ uint32_t swizzled_mn(uint32_t row, uint32_t k) {
  return (k / 8) * 2048 + (row / 64) * 1024 + swizzled(k % 8, (row % 64) * 2);
}

// Bit casts, vector loads and shared-memory adds that also compile for the host.
FASTFA_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

FASTFA_HOST_DEVICE uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FASTFA_HOST_DEVICE uint4 load_vector(const void* pointer) {
#if defined(__CUDA_ARCH__)
  return __ldg(static_cast<const uint4*>(pointer));
#else
  return *static_cast<const uint4*>(pointer);
#endif
}

FASTFA_HOST_DEVICE void add_to_shared(float* sum, float value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(sum, value);
#else
  *sum += value;  // the host check runs the threads one after another
#endif
}

template <class Element>
struct Traits;

template <>
struct Traits<Bf16> {
  using Bits = uint16_t;
  using Sm80Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                 cute::SM90::GMMA::Major::K>;
  // B MN-major in shared memory (wgmma's transpose bit; 16-bit types only).
  using Sm90OpMnB = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                    cute::SM90::GMMA::Major::MN>;
  FASTFA_HOST_DEVICE static float to_float(Bits b) { return float_from_bits(uint32_t(b) << 16); }
  FASTFA_HOST_DEVICE static Bits operand(float x) { return __bfloat16_as_ushort(__float2bfloat16(x)); }
  FASTFA_HOST_DEVICE static Bits output(float x) { return operand(x); }
  FASTFA_HOST_DEVICE static Bits operand_bits(Bits b) { return b; }
};

template <>
struct Traits<Fp16> {
  using Bits = uint16_t;
  using Sm80Op = cute::SM80_16x8x16_F32F16F16F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                               cute::SM90::GMMA::Major::K>;
  using Sm90OpMnB = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                                  cute::SM90::GMMA::Major::MN>;
  FASTFA_HOST_DEVICE static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  FASTFA_HOST_DEVICE static Bits operand(float x) { return __half_as_ushort(__float2half(x)); }
  FASTFA_HOST_DEVICE static Bits output(float x) { return operand(x); }
  FASTFA_HOST_DEVICE static Bits operand_bits(Bits b) { return b; }
};

template <>
struct Traits<Tf32> {
  using Bits = uint32_t;
  using Sm80Op = cute::SM80_16x8x8_F32TF32TF32F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x8_F32TF32TF32_SS_TN<>;
  using Sm90OpMnB = void;  // tf32 wgmma reads K-major operands only
  FASTFA_HOST_DEVICE static float to_float(Bits b) { return float_from_bits(b); }
  // Round to nearest (ties away), as cuBLAS's tf32 path does, rather than letting the
  // tensor core truncate the low mantissa bits.
  FASTFA_HOST_DEVICE static Bits operand(float x) {
#if defined(__CUDA_ARCH__)
    uint32_t bits;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
    return bits;
#else
    const uint32_t bits = bits_from_float(x);
    // cvt.rna: add half of the dropped 13 bits' range, keep 10 mantissa bits; Inf / NaN as they are.
    return (bits & 0x7F800000u) == 0x7F800000u ? bits : (bits + 0x1000u) & 0xFFFFE000u;
#endif
  }
  FASTFA_HOST_DEVICE static Bits output(float x) { return bits_from_float(x); }  // outputs stay fp32
  FASTFA_HOST_DEVICE static Bits operand_bits(Bits b) { return operand(float_from_bits(b)); }
};

} // namespace detail

// ---- Transforms of B's elements (the rule's hook) --------------------------------------

// B used as it is: the forward's W, grad_weight's x, and grad_input for bp, a stored fa R
// and the estimated rules' B (the caller passes R or B as the operand itself).
struct IdentityTransform {
  static constexpr bool kIdentity = true;
  static constexpr bool kReadsWeight = true;
  static constexpr bool kReadsStored = false;
  static constexpr bool kDraws = false;
  static constexpr bool kMasksOutside = false;
  static constexpr bool kSignOfWeight = false;
  static constexpr bool kMagnitudeTimesSign = false;
  FASTFA_HOST_DEVICE void prepare() {}
  FASTFA_HOST_DEVICE const void* stored() const { return nullptr; }
};

// B = T(W) for one rule, from feedback.h's feedback_transform (the formula every backend
// shares): usf, brsf, frsf, and fa regenerating R from (seed, step).
template <Rule kRule>
struct RuleTransform {
  static constexpr bool kIdentity = false;
  static constexpr bool kReadsWeight = kRule != Rule::kFeedbackAlignment;  // drawn fa is R alone
  static constexpr bool kReadsStored = kRule == Rule::kFixedRandomSignFeedback;
  static constexpr bool kDraws = kRule == Rule::kBatchRandomSignFeedback || kRule == Rule::kFeedbackAlignment;
  // The sign rules map the loaders' zero fill outside W to zero; a drawn R is not zero
  // there, so drawn fa masks the outside itself.
  static constexpr bool kMasksOutside = kRule == Rule::kFeedbackAlignment;
  // B = scale * sign(W): the loaders apply it to packed 16-bit words as bit operations.
  static constexpr bool kSignOfWeight = kRule == Rule::kUniformSignSymmetry;
  // B = |R| * sign(W): the loaders take R's magnitude and W's sign as bits where that is exact.
  static constexpr bool kMagnitudeTimesSign = kRule == Rule::kFixedRandomSignFeedback;
  FeedbackArgs args;
  uint64_t seed = 0, step = 0;

  // [seed, step] is read on the device, so a step counter living on the GPU costs no
  // host synchronisation (as in the transform kernel).
  FASTFA_HOST_DEVICE void prepare() {
    if constexpr (kDraws) {
      seed = static_cast<uint64_t>(args.rng[0]);
      step = static_cast<uint64_t>(args.rng[1]);
    }
  }
  FASTFA_HOST_DEVICE const void* stored() const { return kReadsStored ? args.stored : nullptr; }
  FASTFA_HOST_DEVICE float operator()(float w, float stored, float xi) const {
    // As feedback_transform_kernel: R is the stored tensor, or scale * xi when drawn.
    const float r = kReadsStored ? stored : args.scale * xi;
    return feedback_transform<float>(kRule, w, r, xi, args.scale);
  }
};

// ---- Where an operand's elements are: indices -----------------------------------------
//
// A loader reads its operand (logically rows x K) through an index:
//   offset(row, k)       the element's offset from the operand's base, or -1 where the
//                        element is zero (outside the matrix, or in a convolution's padding);
//   key(row, k)          W's row-major index of the element, which keys the rule's draws
//                        (strictly increasing along the vector direction);
//   k_contiguous()       whether a thread's vector of elements runs along k (else along
//                        rows): the direction in which memory is contiguous, so loads coalesce;
//   run(row, k, length)  the offset of the `length` elements from (row, k) along that
//                        direction when all are inside and consecutive in memory at an offset
//                        that is a multiple of `length` (one aligned vector load), else -1;
//   gather(row, k, out)  the offsets of those elements one by one (where run() says no).
// A matrix with strides is this one; the convolutions' implicit-GEMM views are in
// implicit_gemm.cuh.
struct MatrixIndex {
  int64_t rows = 0, k_extent = 0, row_stride = 0, k_stride = 1;

  FASTFA_HOST_DEVICE bool k_contiguous() const { return k_stride == 1; }
  FASTFA_HOST_DEVICE int64_t key(int64_t row, int64_t k) const { return row * row_stride + k * k_stride; }
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t k) const {
    return row < rows && k < k_extent ? key(row, k) : -1;
  }
  FASTFA_HOST_DEVICE int64_t run(int64_t row, int64_t k, int length) const {
    const bool along_k = k_contiguous();
    const bool unit = (along_k ? k_stride : row_stride) == 1;
    const int64_t leading = along_k ? row_stride : k_stride;
    const bool inside = along_k ? row < rows && k + length <= k_extent : row + length <= rows && k < k_extent;
    return unit && inside && leading % length == 0 ? key(row, k) : -1;
  }
  template <int kLength>
  FASTFA_HOST_DEVICE void gather(int64_t row, int64_t k, int64_t (&out)[kLength]) const {
    const bool along_k = k_contiguous();
#pragma unroll
    for (int i = 0; i < kLength; ++i) {
      out[i] = along_k ? offset(row, k + i) : offset(row + i, k);
    }
  }
  // Whether every vector of `length` elements of a tile of `tile_rows` x `tile_k` lies at a fixed
  // distance from the tile's first element, each one aligned load (run()'s conditions without
  // the bounds), with distances that fit 32 bits: then the loaders' interior tiles only add
  // the tile's base, with no per-vector index arithmetic.
  FASTFA_HOST_DEVICE bool fixed_tiles(int length, int tile_rows, int tile_k) const {
    const bool along_k = k_contiguous();
    const bool unit = (along_k ? k_stride : row_stride) == 1;
    const int64_t leading = along_k ? row_stride : k_stride;
    return unit && leading % length == 0 && row_stride >= 0 && k_stride >= 0 &&
           tile_rows * row_stride + tile_k * k_stride < (int64_t(1) << 31);
  }
  FASTFA_HOST_DEVICE bool inside(int64_t row0, int64_t k0, int tile_rows, int tile_k) const {
    return row0 + tile_rows <= rows && k0 + tile_k <= k_extent;
  }
};

// Indices with fixed_tiles() / inside(): the loaders' interior fast path.
template <class Index>
struct HasFixedTiles : std::false_type {};
template <>
struct HasFixedTiles<MatrixIndex> : std::true_type {};

// Indices whose K runs over a filter's taps (kh, kw) in blocks of whole tiles of channels:
// the convolutions' views of implicit_gemm.cuh, walked tile by tile by a TapWalk.
template <class Index>
struct HasTapWalk : std::false_type {};

// The position of x's one set bit.
FASTFA_HOST_DEVICE int bit_index(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __ffs(x) - 1;
#else
  int i = 0;
  while ((x >> i) != 1u) {
    ++i;
  }
  return i;
#endif
}

// One thread's walk along K over a convolution operand's taps (the way CUTLASS's "optimized"
// conv iterators walk theirs): where the index's walks() holds, K is taps x channels with
// channels a whole number of k-tiles, at most 32 taps, so every k-tile lies in one tap and
// every element a thread loads is at
//   base[v] + tap_offset(kh, kw) + the tile's channel block,   inside where bit kh KW + kw of mask[v] is set.
// base and mask, per vector, are the index's walk_base(), computed once in the prologue: the
// vector's row (pixel or channel) with the padding, stride and edge tests over every tap
// folded into the mask (a row past the edge: an empty mask). A k-tile then only adds the
// channel step to `running`, and every channels / k-tile tiles the tap moves on (a branch
// that every thread takes together). Offsets are 32-bit (the op keeps every element within
// 2^31 of the base); they wrap where a tap is outside, and such a vector is never read.
template <int kVectors>
struct TapWalk {
  uint32_t base[kVectors];
  uint32_t mask[kVectors];
  uint32_t running = 0;  // the current tile's tap offset plus its channel block
  uint32_t tap_bit = 0;  // the tap's bit: 1 << (kh KW + kw)
  int tile_in_tap = 0;

  // At the k-tile whose first element is k0 (a multiple of tile_k); row(v) and k(v) are vector
  // v's absolute row and its k within the tile.
  template <class Index, class Row, class K>
  FASTFA_HOST_DEVICE void start(const Index& index, int64_t k0, Row&& row, K&& k) {
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      base[v] = index.walk_base(row(v), k(v), mask[v]);
    }
    const int channels = index.walk_channels(), taps = int(k0 / channels);
    const int channel = int(k0 - int64_t(taps) * channels);
    tile_in_tap = channel / index.walk_tile_k();
    tap_bit = taps < 32 ? 1u << taps : 0u;  // past the last tap (an empty K slice): nothing inside
    running = tap_offset(index, taps) + uint32_t(channel) * index.walk_channel_stride();
  }
  template <class Index>
  FASTFA_HOST_DEVICE static uint32_t tap_offset(const Index& index, int tap) {
    const int kh = tap / index.g.kernel_w;
    return index.tap_offset(kh, tap - kh * index.g.kernel_w);
  }
  FASTFA_HOST_DEVICE bool inside(int v) const { return (mask[v] & tap_bit) != 0; }
  FASTFA_HOST_DEVICE int32_t offset(int v) const { return static_cast<int32_t>(base[v] + running); }
  template <class Index>
  FASTFA_HOST_DEVICE void advance(const Index& index) {
    running += index.walk_step();
    if (++tile_in_tap == index.walk_tiles_per_tap()) {
      // The next tap, from its bit (kh and kw would hold two more registers through the loop).
      tile_in_tap = 0;
      tap_bit <<= 1;
      running = tap_bit != 0 ? tap_offset(index, bit_index(tap_bit)) : 0u;
    }
  }
};

// A GEMM C = A B^T over the operands' indices; grid.z splits K into slices of
// k_tiles_per_split tiles (0: one slice), each written by the epilogue as its own partial.
template <class AIndex, class BIndex>
struct GemmProblem {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  AIndex a_index;
  const void* b = nullptr;
  BIndex b_index;
  int64_t k_tiles_per_split = 0;
};

// ---- Where C's elements go: epilogues -------------------------------------------------
//
// An epilogue takes the accumulators two columns at a time, (row, col) and (row, col + 1)
// with col even, from K slice `split`. Those with kRowSums take A's row sums over the
// slice too (row_sum), when wants_row_sums().

// C as a row-major matrix with leading dimension ldc.
struct MatrixOutput {
  int64_t ldc = 0;
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t col) const { return row * ldc + col; }
};

template <class Element, class Output>
struct StoreEpilogue {
  using Bits = typename detail::Traits<Element>::Bits;
  static constexpr bool kRowSums = true;
  void* c = nullptr;
  Output output;
  int64_t m = 0, n = 0;
  void* row_sums = nullptr;  // A's row sums (grad_bias), in C's dtype
  const float* output_scale = nullptr;  // C's factor on the device (usf's "rms" scale), or none

  FASTFA_HOST_DEVICE bool wants_row_sums() const { return row_sums != nullptr; }
  FASTFA_HOST_DEVICE void row_sum(int64_t row, int64_t /*split*/, float value) const {
    static_cast<Bits*>(row_sums)[row] = detail::Traits<Element>::output(value);
  }
  FASTFA_HOST_DEVICE void operator()(int64_t row, int64_t col, int64_t /*split*/, float v0, float v1) const {
    if (row >= m || col >= n) {
      return;
    }
    if (output_scale != nullptr) {
      const float s = *output_scale;
      v0 *= s;
      v1 *= s;
    }
    Bits* out = static_cast<Bits*>(c);
    const int64_t at = output.offset(row, col);
    const Bits b0 = detail::Traits<Element>::output(v0), b1 = detail::Traits<Element>::output(v1);
    if (col + 1 < n) {
      const int64_t next = output.offset(row, col + 1);
      if (next == at + 1 && (reinterpret_cast<uintptr_t>(out + at) % (2 * sizeof(Bits))) == 0) {
        if constexpr (sizeof(Bits) == 2) {
          *reinterpret_cast<uint32_t*>(out + at) = uint32_t(b0) | (uint32_t(b1) << 16);
        } else {
          *reinterpret_cast<uint2*>(out + at) = make_uint2(b0, b1);
        }
      } else {
        out[at] = b0;
        out[next] = b1;
      }
    } else {
      out[at] = b0;
    }
  }
};

// One K slice's partial C and row sums in fp32 (split-K): slice `split` of
// partial[splits][m][n] and of partial_row_sums[splits][m]; the host adds the slices.
struct SplitEpilogue {
  static constexpr bool kRowSums = true;
  float* partial = nullptr;
  float* partial_row_sums = nullptr;
  int64_t m = 0, n = 0;
  const float* output_scale = nullptr;  // C's factor on the device (usf's "rms" scale), or none

  FASTFA_HOST_DEVICE bool wants_row_sums() const { return partial_row_sums != nullptr; }
  FASTFA_HOST_DEVICE void row_sum(int64_t row, int64_t split, float value) const {
    partial_row_sums[split * m + row] = value;
  }
  FASTFA_HOST_DEVICE void operator()(int64_t row, int64_t col, int64_t split, float v0, float v1) const {
    if (row >= m || col >= n) {
      return;
    }
    if (output_scale != nullptr) {
      const float s = *output_scale;
      v0 *= s;
      v1 *= s;
    }
    float* out = partial + (split * m + row) * n + col;
    out[0] = v0;
    if (col + 1 < n) {
      out[1] = v1;
    }
  }
};

FASTFA_HOST_DEVICE float activate(Activation activation, float z) {
  switch (activation) {
  case Activation::kRelu:
    return z < 0.0f ? 0.0f : z;  // NaN stays NaN, as torch.relu
  case Activation::kGelu:
    return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
  case Activation::kGeluTanh:
    return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
  case Activation::kSilu:
    return z / (1.0f + expf(-z));
  case Activation::kTanh:
    return tanhf(z);
  case Activation::kSigmoid:
    return 1.0f / (1.0f + expf(-z));
  case Activation::kNone:
  default:
    return z;
  }
}

// A layer's forward: r = acc, z = r + b[col], output = act(z); z kept for gelu / silu,
// r for aa / ia. Columns are the layer's output features (channels for a convolution).
template <class Element, class Output>
struct BiasActivationEpilogue {
  using Bits = typename detail::Traits<Element>::Bits;
  static constexpr bool kRowSums = false;
  void* c = nullptr;
  Output output;
  int64_t m = 0, n = 0;
  LinearEpilogueArgs args;

  FASTFA_HOST_DEVICE bool wants_row_sums() const { return false; }
  FASTFA_HOST_DEVICE void row_sum(int64_t, int64_t, float) const {}
  FASTFA_HOST_DEVICE void operator()(int64_t row, int64_t col, int64_t /*split*/, float v0, float v1) const {
    if (row >= m) {
      return;
    }
    const float values[2] = {v0, v1};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (col + j >= n) {
        break;
      }
      const int64_t at = output.offset(row, col + j);
      const float r = values[j];
      const float z = args.bias != nullptr ? r + detail::Traits<Element>::to_float(
                                                     static_cast<const Bits*>(args.bias)[col + j])
                                           : r;
      if (args.projection != nullptr) {
        static_cast<Bits*>(args.projection)[at] = detail::Traits<Element>::output(r);
      }
      if (args.saved != nullptr) {
        static_cast<Bits*>(args.saved)[at] = detail::Traits<Element>::output(z);
      }
      static_cast<Bits*>(c)[at] = detail::Traits<Element>::output(activate(args.activation, z));
    }
  }
};

namespace detail {

// feedback.h's unit_draw (uniform) for an index not known at compile time. unit_draw picks
// the word with words[index % 4], a runtime index into an array, which the compiler puts in
// local memory; here selects pick it from registers, and the bits are the same.
FASTFA_HOST_DEVICE float unit_draw_in_registers(uint64_t seed, uint64_t step, uint64_t index,
                                                Distribution distribution) {
  const Philox4x32 bits = draw_block(seed, step, index >> 2);
  const uint32_t lane = static_cast<uint32_t>(index & 3u);
  const uint32_t word = lane == 0 ? bits.x0 : lane == 1 ? bits.x1 : lane == 2 ? bits.x2 : bits.x3;
  return unit_from_words(&word, 0u, distribution);
}

// The K tiles [first, end) of slice `split`.
FASTFA_HOST_DEVICE void split_tiles(int64_t k_tiles, int64_t per_split, int64_t split, int64_t& first,
                                    int64_t& end) {
  if (per_split <= 0) {
    first = 0;
    end = k_tiles;
    return;
  }
  first = split * per_split;
  end = first + per_split < k_tiles ? first + per_split : k_tiles;
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// A store to shared memory through a 32-bit shared address (STS): through a generic pointer it
// would be a 64-bit generic store (ST.E) with 64-bit address arithmetic. On the host (the
// data-path check) a plain copy.
template <class T>
FASTFA_HOST_DEVICE void store_shared(unsigned char* tile, uint32_t offset, const T& value) {
#if defined(__CUDA_ARCH__)
  const uint32_t address = shared_address(tile) + offset;
  if constexpr (sizeof(T) == 16) {
    const uint4& v = reinterpret_cast<const uint4&>(value);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
  } else if constexpr (sizeof(T) == 4) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(static_cast<uint32_t>(value)) : "memory");
  } else {
    static_assert(sizeof(T) == 2, "16-, 32- or 128-bit stores");
    asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(address), "h"(static_cast<uint16_t>(value)) : "memory");
  }
#else
  std::memcpy(tile + offset, &value, sizeof(T));
#endif
}

// 16 bytes from global to shared memory without registers (cp.async, completed by
// wait_async_copies); on the host a plain copy.
FASTFA_HOST_DEVICE void copy_to_shared_async(unsigned char* tile, uint32_t offset, const void* global) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(tile) + offset), "l"(global)
               : "memory");
#else
  std::memcpy(tile + offset, global, 16);
#endif
}

// The same, or 16 zero bytes where `inside` is false (cp.async's source size 0: nothing is read).
FASTFA_HOST_DEVICE void copy_to_shared_async_or_zero(unsigned char* tile, uint32_t offset, const void* global,
                                                     bool inside) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(tile) + offset), "l"(global),
               "r"(inside ? 16 : 0)
               : "memory");
#else
  if (inside) {
    std::memcpy(tile + offset, global, 16);
  } else {
    std::memset(tile + offset, 0, 16);
  }
#endif
}

// One cp.async group per k-tile (empty where the tile has no copies, so that the count stays
// one per tile); wait_async_copies<N> waits until at most N of this thread's groups are pending.
__device__ __forceinline__ void commit_async_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait_async_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Each 16-bit half of x made all ones where its top bit is set, else zero: prmt's sign
// replication of bytes 1 and 3, one instruction.
FASTFA_HOST_DEVICE uint32_t half_masks(uint32_t x) {
#if defined(__CUDA_ARCH__)
  uint32_t mask;
  asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(mask) : "r"(x));
  return mask;
#else
  return ((x & 0x8000u) ? 0x0000FFFFu : 0u) | ((x & 0x80000000u) ? 0xFFFF0000u : 0u);
#endif
}

// usf's B = scale * sign(W) on two 16-bit operands at once, bit for bit what the float path
// (feedback_transform, then the rounding to the operand type) gives each element: one of
// four results, by W's sign, zero and NaN, each the rounding of feedback_transform on a
// representative W. Nine integer instructions per two elements, where the float path spends
// about fifteen (tests/cuda/implicit_gemm_check.cu compares the two on every 16-bit W).
template <class Element>
struct PackedSignOfWeight {
  static_assert(sizeof(typename Traits<Element>::Bits) == 2, "16-bit operands");
  // Added to a magnitude, carries into bit 15 exactly when it is above infinity's: a NaN.
  static constexpr uint32_t kNanCarry = std::is_same<Element, Bf16>::value ? 0x007F007Fu : 0x03FF03FFu;
  uint32_t positive, negative, zero, nan;

  FASTFA_HOST_DEVICE static uint32_t both_halves(float w, float scale) {
    const uint32_t b =
        Traits<Element>::operand(feedback_transform<float>(Rule::kUniformSignSymmetry, w, 0.0f, 0.0f, scale));
    return b | (b << 16);
  }
  FASTFA_HOST_DEVICE explicit PackedSignOfWeight(float scale)
      : positive(both_halves(1.0f, scale)), negative(both_halves(-1.0f, scale)), zero(both_halves(0.0f, scale)),
        nan(both_halves(float_from_bits(0x7FC00000u), scale)) {}

  FASTFA_HOST_DEVICE uint32_t operator()(uint32_t w) const {
    const uint32_t magnitude = w & 0x7FFF7FFFu;
    const uint32_t negative_halves = half_masks(w);
    const uint32_t nonzero_halves = half_masks(magnitude + 0x7FFF7FFFu);
    const uint32_t nan_halves = half_masks(magnitude + kNanCarry);
    uint32_t b = (negative & negative_halves) | (positive & ~negative_halves);
    b = (b & nonzero_halves) | (zero & ~nonzero_halves);
    return (nan & nan_halves) | (b & ~nan_halves);
  }
};

// Three-way minimum of each unsigned 16-bit half (min.u16x2, sm_90: one VIMNMX3 for both mins).
FASTFA_HOST_DEVICE uint32_t min_halves(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t m;
  asm("min.u16x2 %0, %1, %2;\n\tmin.u16x2 %0, %0, %3;\n" : "=&r"(m) : "r"(a), "r"(b), "r"(c));
  return m;
#elif defined(__CUDA_ARCH__)
  return __vminu2(__vminu2(a, b), c);
#else
  uint32_t m = 0;
  for (int shift = 0; shift < 32; shift += 16) {
    const uint32_t x = (a >> shift) & 0xFFFFu, y = (b >> shift) & 0xFFFFu, z = (c >> shift) & 0xFFFFu;
    const uint32_t xy = x < y ? x : y;
    m |= (xy < z ? xy : z) << shift;
  }
  return m;
#endif
}

// The sign rules' common case on packed 16-bit words, one bit operation per word. Where no
// half of W is +-0 or NaN (and, for frsf, no half of R), sign(W) is +-1, and
//   usf:  B = scale * sign(W) rounds to P = round(scale) or N = round(-scale) = P with its sign
//         bit set (round to nearest is symmetric; not so only for a NaN scale, `symmetric`):
//         B = P ^ (W's sign bits);
//   frsf: B = |R| * sign(W) is exact: R's magnitude bits under W's sign bit.
// Everything else (a zero or NaN anywhere in a thread's tile: the zero fill of an edge tile, a
// pruned weight) takes the exact general path, so the bits are the float path's either way
// (tests/cuda/implicit_gemm_check.cu compares the two over every 16-bit W and R).
//
// The test costs one LEA per word and one VIMNMX3 per two words: key(x) is, per half,
// 2 (x + 2^m - 1) mod 2^16 (m mantissa bits). x + 2^m - 1 has a zero exponent field exactly
// where x is +-0 (2^m - 1, 0x8000 + 2^m - 1) or a NaN (its magnitude above infinity's carries
// into the sign bit, or a negative NaN wraps below 2^m); doubling drops the sign bit, so the
// half is special exactly where its key is below 2^(m + 1). On a 32-bit word the low half
// carries into the high one only where it is special itself. The keys' halves are folded
// with a minimum: a tile is ordinary when both halves of the minimum are at least 2^(m + 1).
template <class Element>
struct PackedSignFastPath {
  static_assert(sizeof(typename Traits<Element>::Bits) == 2, "16-bit operands");
  static constexpr uint32_t kMantissaBits = std::is_same<Element, Bf16>::value ? 7 : 10;
  static constexpr uint32_t kKeyOffset = ((1u << kMantissaBits) - 1u) * 2u * 0x00010001u;
  static constexpr uint32_t kOrdinaryFrom = 1u << (kMantissaBits + 1);
  static constexpr uint32_t kSignBits = 0x80008000u;

  FASTFA_HOST_DEVICE static uint32_t key(uint32_t word) { return word * 2u + kKeyOffset; }
  FASTFA_HOST_DEVICE static bool ordinary(uint32_t lowest_key) {
    return (lowest_key & 0xFFFFu) >= kOrdinaryFrom && (lowest_key >> 16) >= kOrdinaryFrom;
  }
  // usf, for an ordinary W word and a symmetric scale (positive: both halves P).
  FASTFA_HOST_DEVICE static uint32_t sign_of_weight(uint32_t w, uint32_t positive) { return positive ^ (w & kSignBits); }
  FASTFA_HOST_DEVICE static bool symmetric(const PackedSignOfWeight<Element>& sign) {
    return (sign.positive ^ kSignBits) == sign.negative;
  }
  // frsf, for ordinary W and R words.
  FASTFA_HOST_DEVICE static uint32_t magnitude_times_sign(uint32_t w, uint32_t r) {
#if defined(__CUDA_ARCH__)
    // One LOP3 (r & ~c) | (w & c) with c = kSignBits; left to itself ptxas spends two.
    uint32_t b;
    asm("lop3.b32 %0, %1, %2, %3, 0xD8;" : "=r"(b) : "r"(r), "r"(w), "n"(kSignBits));
    return b;
#else
    return (r & ~kSignBits) | (w & kSignBits);
#endif
  }
};

// ---- Loading a tile: global -> registers -> (transform) -> swizzled shared memory --------
//
// Thread `thread` of the CTA's 256 loads four 16-byte vectors of the 128 x 128-byte tile.
// Interior tiles of a strided matrix (HasFixedTiles: all rows and K inside) take a fast path,
// fetch_interior(): each vector lies at a distance from the tile's first element fixed at
// construction, and the tile's pointer only advances along K, so a tile costs a load per
// vector and one pointer increment; a tile copied as it is (bf16 / fp16 without row sums,
// K-major: only then is it interior) goes to shared memory by cp.async, never through
// registers, issued by commit() (fetch() and fetch_interior() touch registers only, so the
// loop may issue them before its stage is free). A convolution's view whose K walks its taps
// (HasTapWalk, TapWalk) takes the same path on every tile of every CTA, edges included: a
// vector costs its mask test and a 32-bit add, and one outside (padding, a row past the edge)
// is zero-filled by cp.async or not loaded. Everything else (edge tiles of a matrix, the
// other conv views, misaligned data) goes through fetch() and the index.

// kMnShared: an operand whose vectors run along rows (MN-major) stays MN-major in shared
// memory (swizzled_mn, for wgmma's transpose bit), one 16-byte store per vector; without it
// (mma.sync, tf32) its elements are stored one by one into the K-major tile.
template <class Element, class Transform, class Index, bool kRowSums, bool kMnShared = false>
struct TileLoader {
  using Bits = typename Traits<Element>::Bits;
  static constexpr int kVector = 16 / int(sizeof(Bits));     // elements per 16-byte vector
  static constexpr int kTileK = kRowBytes / int(sizeof(Bits));  // K elements per tile
  union Pack {
    uint4 vector;
    Bits element[kVector];
  };

  static constexpr bool kFixedTiles = HasFixedTiles<Index>::value;
  // brsf's B (a draw per element and W) is the one whose working set has no room for the
  // walk's registers (252 with it, over its ceiling of 248 in tests/test_sass.py): it indexes
  // every vector as before. Where the cost model draws B once (fastfa/dispatch.h), the identity
  // kernel that multiplies it walks.
  static constexpr bool kWalks = HasTapWalk<Index>::value && !(Transform::kDraws && Transform::kReadsWeight);
  static constexpr bool kInterior = kFixedTiles || kWalks;  // an interior path exists
  static constexpr bool kCopies = Transform::kIdentity && !kRowSums && sizeof(Bits) == 2;
  static constexpr bool kPackedSign = Transform::kSignOfWeight && sizeof(Bits) == 2;
  // usf / frsf tiles with no zero or NaN operand take PackedSignFastPath (commit_ordinary).
  static constexpr bool kSignFast = (Transform::kSignOfWeight || Transform::kMagnitudeTimesSign) && sizeof(Bits) == 2;
  // A thread's vectors lie 32 tile rows apart in either direction (a whole number of swizzle
  // periods of 8 rows), so their shared offsets differ by a constant.
  static constexpr uint32_t kVectorStride = 32 * kRowBytes;
  static_assert(kThreads / (kRowBytes / 16) == 32 && kThreads / kTileK * kVector == 32, "vector rows");
  static_assert(!kMnShared || (sizeof(Bits) == 2 && kThreads / (kTileRows / kVector) == 16 &&
                               (16 / 8) * 2048 == kVectorStride),
                "MN-major vectors: 16 k apart, one vector stride");

  const Bits* data;
  const Bits* stored;
  Index index;
  int thread;
  bool k_contiguous, aligned;
  uint32_t store_at = 0;  // shared_offset(0, 0), kept: recomputing the swizzle costs ~5 per vector
  bool fixed = false;   // the interior fast path applies (kFixedTiles)
  bool copied = false;  // the last fetch goes to shared memory by cp.async at commit (kCopies)
  int32_t distance[kFixedTiles ? kVectorsPerThread : 1];
  const Bits* tile_data = nullptr;  // the next interior tile's first element, and of stored
  const Bits* tile_stored = nullptr;
  int64_t k_step = 0;  // elements from one tile to the next along K
  TapWalk<kWalks ? kVectorsPerThread : 1> walk;  // the interior path of a convolution's view (kWalks)
  uint4 raw[kVectorsPerThread];
  uint4 raw_stored[Transform::kReadsStored ? kVectorsPerThread : 1];
  // Bit i of present[v]: element i of vector v is inside the operand (for transforms that
  // do not map the zero fill to zero).
  uint32_t present[Transform::kMasksOutside ? kVectorsPerThread : 1];
  float row_sum[kRowSums ? kVectorsPerThread : 1][kRowSums ? kVector : 1];

  FASTFA_HOST_DEVICE TileLoader(const void* data_, const void* stored_data, const Index& index_, int thread_)
      : data(static_cast<const Bits*>(data_)), stored(static_cast<const Bits*>(stored_data)), index(index_),
        thread(thread_) {
    k_contiguous = index.k_contiguous();
    int row0, k0;
    coordinates(0, row0, k0);
    store_at = mn_shared() ? swizzled_mn(row0, k0) : swizzled(row0, k0 * sizeof(Bits));
    // 16-byte vector loads need 16-byte aligned bases (run() keeps offsets in whole vectors).
    aligned = (reinterpret_cast<uintptr_t>(data) % 16) == 0 &&
              (!Transform::kReadsStored || (reinterpret_cast<uintptr_t>(stored) % 16) == 0);
    if constexpr (kFixedTiles) {
      fixed = aligned && index.fixed_tiles(kVector, kTileRows, kTileK);
#pragma unroll
      for (int v = 0; v < kVectorsPerThread; ++v) {
        int row, k;
        coordinates(v, row, k);
        distance[v] = static_cast<int32_t>(index.key(row, k));
      }
    }
    if constexpr (kRowSums) {
#pragma unroll
      for (int v = 0; v < kVectorsPerThread; ++v) {
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          row_sum[v][i] = 0.0f;
        }
      }
    }
  }

  // Tile-local (row, k) of vector v's first element. Along k: a warp covers four rows of
  // eight 16-byte chunks (coalesced 128-byte rows, conflict-free swizzled stores). Along
  // rows: a warp covers 32 consecutive k of one row vector, so its element-wise stores into
  // the K-major tile fall in distinct banks.
  // Whether the tile is stored MN-major (kMnShared and vectors along rows): a compile-time
  // false where kMnShared is, so the element-by-element stores fold away where they cannot run.
  FASTFA_HOST_DEVICE bool mn_shared() const { return kMnShared && !k_contiguous; }

  // Stored MN-major, a warp covers 16 vectors of one k (256 bytes of a contiguous row of the
  // operand: coalesced) and two k: each 8 lanes of a 16-byte store phase hit one swizzled line.
  FASTFA_HOST_DEVICE void coordinates(int v, int& row, int& k) const {
    const int flat = thread + v * kThreads;
    if (mn_shared()) {
      row = (flat % (kTileRows / kVector)) * kVector;
      k = flat / (kTileRows / kVector);
    } else if (k_contiguous) {
      row = flat / (kRowBytes / 16);
      k = (flat % (kRowBytes / 16)) * kVector;
    } else {
      k = flat % kTileK;
      row = (flat / kTileK) * kVector;
    }
  }

  // Byte offset in the tile of element i of vector v (the vector itself where it runs along k).
  FASTFA_HOST_DEVICE uint32_t shared_offset(int v, int i) const {
    if (k_contiguous || mn_shared()) {
      return store_at + v * kVectorStride;
    }
    int row, k;
    coordinates(0, row, k);
    return swizzled(row + i, k * sizeof(Bits)) + v * kVectorStride;
  }

  // Byte offset of element (row, k) in the stored tile (the host check reads tiles with it).
  FASTFA_HOST_DEVICE uint32_t tile_offset(int row, int k) const {
    return mn_shared() ? swizzled_mn(row, k) : swizzled(row, k * sizeof(Bits));
  }

  // (row, k) of element i of the vector that starts at (row, k).
  FASTFA_HOST_DEVICE int64_t element_row(int64_t row, int i) const { return k_contiguous ? row : row + i; }
  FASTFA_HOST_DEVICE int64_t element_k(int64_t k, int i) const { return k_contiguous ? k + i : k; }

  // Points the interior path at the tile (row0, k0); whether the tiles from there along K are
  // interior wherever K is (every row inside, the fixed distances valid).
  FASTFA_HOST_DEVICE bool start_interior(int64_t row0, int64_t k0) {
    if constexpr (kWalks) {
      // Every tile of the walk is on the path, edge rows included (their masks are empty). A
      // copied operand needs its vectors whole in shared memory: K-major, or MN-major for wgmma.
      if (!aligned || !index.walks() || (kCopies && !k_contiguous && !mn_shared())) {
        return false;
      }
      walk.start(
          index, k0,
          [&](int v) {
            int row, k;
            coordinates(v, row, k);
            return row0 + row;
          },
          [&](int v) {
            int row, k;
            coordinates(v, row, k);
            return k;
          });
      return true;
    } else if constexpr (kFixedTiles) {
      tile_data = data + index.key(row0, k0);
      tile_stored = Transform::kReadsStored ? stored + index.key(row0, k0) : nullptr;
      k_step = index.key(0, kTileK);
      // A copied operand takes the interior path K-major only (cp.async needs no registers
      // there; both paths in one place would be issued both, predicated, on every tile).
      return fixed && (!kCopies || k_contiguous) && index.inside(row0, 0, kTileRows, 0);
    } else {
      return false;
    }
  }

  // Issues the loads of the next interior tile (after start_interior, tiles in order along K);
  // a copied tile's cp.async waits for commit().
  FASTFA_HOST_DEVICE void fetch_interior() {
    if constexpr (kWalks) {
      if constexpr (kCopies) {
        copied = true;
      } else {
#pragma unroll
        for (int v = 0; v < kVectorsPerThread; ++v) {
          const bool inside = walk.inside(v);
          const int32_t at = walk.offset(v);
          const uint4 zero = make_uint4(0, 0, 0, 0);
          raw[v] = Transform::kReadsWeight && inside ? load_vector(data + at) : zero;
          if constexpr (Transform::kReadsStored) {
            raw_stored[v] = inside ? load_vector(stored + at) : zero;
          }
          if constexpr (Transform::kMasksOutside) {
            present[v] = inside ? (1u << kVector) - 1u : 0u;
          }
        }
        walk.advance(index);
      }
    } else if constexpr (kFixedTiles) {
      if constexpr (kCopies) {
        copied = true;
      } else {
#pragma unroll
        for (int v = 0; v < kVectorsPerThread; ++v) {
          raw[v] = Transform::kReadsWeight ? load_vector(tile_data + distance[v]) : make_uint4(0, 0, 0, 0);
          if constexpr (Transform::kReadsStored) {
            raw_stored[v] = load_vector(tile_stored + distance[v]);
          }
          if constexpr (Transform::kMasksOutside) {
            present[v] = (1u << kVector) - 1u;
          }
        }
        if constexpr (Transform::kReadsStored) {
          tile_stored += k_step;
        }
        tile_data += k_step;
      }
    }
  }

  // Issues the global loads of the tile at (row0, k0); elements outside read as zero.
  FASTFA_HOST_DEVICE void fetch(int64_t row0, int64_t k0) {
    if constexpr (kCopies) {
      copied = false;
    }
#pragma unroll
    for (int v = 0; v < kVectorsPerThread; ++v) {
      int row, k;
      coordinates(v, row, k);
      const int64_t grow = row0 + row, gk = k0 + k;
      Pack w, r;
      w.vector = make_uint4(0, 0, 0, 0);
      r.vector = make_uint4(0, 0, 0, 0);
      uint32_t inside = 0;
      const int64_t start = aligned ? index.run(grow, gk, kVector) : -1;
      if (start >= 0) {
        if constexpr (Transform::kReadsWeight) {
          w.vector = load_vector(data + start);
        }
        if constexpr (Transform::kReadsStored) {
          r.vector = load_vector(stored + start);
        }
        inside = (1u << kVector) - 1u;
      } else {
        int64_t offsets[kVector];
        index.gather(grow, gk, offsets);
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          const int64_t offset = offsets[i];
          if (offset >= 0) {
            if constexpr (Transform::kReadsWeight) {
              w.element[i] = data[offset];
            }
            if constexpr (Transform::kReadsStored) {
              r.element[i] = stored[offset];
            }
            inside |= 1u << i;
          }
        }
      }
      raw[v] = w.vector;
      if constexpr (Transform::kReadsStored) {
        raw_stored[v] = r.vector;
      }
      if constexpr (Transform::kMasksOutside) {
        present[v] = inside;
      }
    }
  }

  // Transforms the fetched tile and stores it, K-major and swizzled, at `tile`.
  FASTFA_HOST_DEVICE void commit(unsigned char* tile, const Transform& transform, int64_t row0, int64_t k0) {
    if constexpr (kCopies && kWalks) {
      if (copied) {
#pragma unroll
        for (int v = 0; v < kVectorsPerThread; ++v) {
          copy_to_shared_async_or_zero(tile, shared_offset(v, 0), data + walk.offset(v), walk.inside(v));
        }
        walk.advance(index);
        return;
      }
    }
    if constexpr (kCopies && kFixedTiles) {
      if (copied) {
#pragma unroll
        for (int v = 0; v < kVectorsPerThread; ++v) {
          copy_to_shared_async(tile, shared_offset(v, 0), tile_data + distance[v]);
        }
        tile_data += k_step;
        return;
      }
    }
    if constexpr (kSignFast) {
      if (commit_ordinary(tile, transform)) {
        return;
      }
    }
#pragma unroll
    for (int v = 0; v < kVectorsPerThread; ++v) {
      int row, k;
      coordinates(v, row, k);
      Pack in, out;
      in.vector = raw[v];
      if constexpr (Transform::kIdentity) {
        // Fetch zero-filled the outside, and the identity keeps zeros.
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          out.element[i] = Traits<Element>::operand_bits(in.element[i]);
        }
      } else if constexpr (kPackedSign) {
        // The zero fill outside W maps to scale * sign(0), as in the float path.
        const PackedSignOfWeight<Element> sign_of_weight(transform.args.scale);
        out.vector = make_uint4(sign_of_weight(in.vector.x), sign_of_weight(in.vector.y),
                                sign_of_weight(in.vector.z), sign_of_weight(in.vector.w));
      } else {
        const int64_t grow = row0 + row, gk = k0 + k;
        float xi[kVector];
        if constexpr (Transform::kDraws) {
          // Uniform draws only: a normal draw's sinf / cosf keep a local-memory array for
          // their (never taken here) huge-argument path, and linear layers draw uniformly;
          // the host materialises normally drawn B with the transform kernel instead.
          // Keys strictly increase along the vector, so a span of kVector - 1 means they are
          // consecutive: then four share a Philox block when the first one starts a block.
          const int64_t first = index.key(grow, gk);
          const int64_t last = index.key(element_row(grow, kVector - 1), element_k(gk, kVector - 1));
          if (last - first == kVector - 1 && (first & 3) == 0) {
#pragma unroll
            for (int j = 0; j < kVector / 4; ++j) {
              const Philox4x32 bits =
                  draw_block(transform.seed, transform.step, (static_cast<uint64_t>(first) >> 2) + j);
              const uint32_t words[4] = {bits.x0, bits.x1, bits.x2, bits.x3};
#pragma unroll
              for (int lane = 0; lane < 4; ++lane) {
                xi[4 * j + lane] = unit_from_words(words, uint32_t(lane), Distribution::kUniform);
              }
            }
          } else {
#pragma unroll
            for (int i = 0; i < kVector; ++i) {
              const int64_t key = index.key(element_row(grow, i), element_k(gk, i));
              xi[i] = unit_draw_in_registers(transform.seed, transform.step, static_cast<uint64_t>(key),
                                             Distribution::kUniform);
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < kVector; ++i) {
            xi[i] = 0.0f;
          }
        }
        Pack stored_pack;
        if constexpr (Transform::kReadsStored) {
          stored_pack.vector = raw_stored[v];
        }
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          const float w = Traits<Element>::to_float(in.element[i]);
          const float r = Transform::kReadsStored ? Traits<Element>::to_float(stored_pack.element[i]) : 0.0f;
          // Outside the operand B must be zero, so the K tail adds nothing.
          const bool inside = Transform::kMasksOutside ? ((present[v] >> i) & 1u) != 0 : true;
          const float b = inside ? transform(w, r, xi[i]) : 0.0f;
          // B rounds once to the operand type, as the aten backend's materialised B does.
          out.element[i] = Traits<Element>::operand(b);
        }
      }
      if constexpr (kRowSums) {
        // Constant indices only, so the sums stay in registers.
        if (k_contiguous) {
#pragma unroll
          for (int i = 0; i < kVector; ++i) {
            row_sum[v][0] += Traits<Element>::to_float(in.element[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kVector; ++i) {
            row_sum[v][i] += Traits<Element>::to_float(in.element[i]);
          }
        }
      }
      store_vector(tile, v, out);
    }
  }

  // The transformed vector v into the tile: one 16-byte store, or element by element into the
  // K-major tile where the vector runs along rows.
  FASTFA_HOST_DEVICE void store_vector(unsigned char* tile, int v, const Pack& out) const {
    if (k_contiguous || mn_shared()) {
      store_shared(tile, shared_offset(v, 0), out.vector);
    } else {
#pragma unroll
      for (int i = 0; i < kVector; ++i) {
        store_shared(tile, shared_offset(v, i), out.element[i]);
      }
    }
  }

  // usf / frsf: where no half of this thread's fetched W (and R) words is +-0 or NaN, B's words
  // by PackedSignFastPath and stored; else false, and commit() takes the exact general path.
  FASTFA_HOST_DEVICE bool commit_ordinary(unsigned char* tile, const Transform& transform) {
    using Fast = PackedSignFastPath<Element>;
    uint32_t lowest = 0xFFFFFFFFu;
#pragma unroll
    for (int v = 0; v < kVectorsPerThread; ++v) {
      const uint32_t w[4] = {raw[v].x, raw[v].y, raw[v].z, raw[v].w};
      if constexpr (Transform::kMagnitudeTimesSign) {
        const uint4& stored_vector = raw_stored[Transform::kReadsStored ? v : 0];
        const uint32_t r[4] = {stored_vector.x, stored_vector.y, stored_vector.z, stored_vector.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          lowest = min_halves(lowest, Fast::key(w[i]), Fast::key(r[i]));
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; i += 2) {
          lowest = min_halves(lowest, Fast::key(w[i]), Fast::key(w[i + 1]));
        }
      }
    }
    uint32_t positive = 0;
    if constexpr (Transform::kSignOfWeight) {
      const PackedSignOfWeight<Element> sign_of_weight(transform.args.scale);
      if (!Fast::symmetric(sign_of_weight)) {
        return false;
      }
      positive = sign_of_weight.positive;
    }
    if (!Fast::ordinary(lowest)) {
      return false;
    }
#pragma unroll
    for (int v = 0; v < kVectorsPerThread; ++v) {
      Pack out;
      if constexpr (Transform::kMagnitudeTimesSign) {
        const uint4& r = raw_stored[Transform::kReadsStored ? v : 0];
        out.vector = make_uint4(Fast::magnitude_times_sign(raw[v].x, r.x), Fast::magnitude_times_sign(raw[v].y, r.y),
                                Fast::magnitude_times_sign(raw[v].z, r.z), Fast::magnitude_times_sign(raw[v].w, r.w));
      } else {
        out.vector = make_uint4(Fast::sign_of_weight(raw[v].x, positive), Fast::sign_of_weight(raw[v].y, positive),
                                Fast::sign_of_weight(raw[v].z, positive), Fast::sign_of_weight(raw[v].w, positive));
      }
      store_vector(tile, v, out);
    }
    return true;
  }

  // Adds this thread's row sums into sums[tile row] (shared memory).
  FASTFA_HOST_DEVICE void reduce_row_sums(float* sums) const {
    if constexpr (kRowSums) {
#pragma unroll
      for (int v = 0; v < kVectorsPerThread; ++v) {
        int row, k;
        coordinates(v, row, k);
        if (k_contiguous) {
          add_to_shared(&sums[row], row_sum[v][0]);
        } else {
#pragma unroll
          for (int i = 0; i < kVector; ++i) {
            add_to_shared(&sums[row + i], row_sum[v][i]);
          }
        }
      }
    }
  }
};

// ---- The MMAs of one shared-memory stage ----------------------------------------------

// mma.sync: warp (warp_m, warp_n) of 2 x 4 owns rows 64 warp_m.., columns 32 warp_n..;
// accumulator[mi][nj] is the m16n8 block (mi, nj) of that slab.
template <class Element>
struct Sm80Math {
  float accumulator[4][4][4];

  __device__ void clear() {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) accumulator[mi][nj][e] = 0.0f;
  }

  // The tile row and 16-byte chunk that `lane` addresses in the ldmatrix.x4 of A's m16 block
  // mi at K step `step`: lanes 0-15 rows 0-15 of the block at chunk 2 step, lanes 16-31 the
  // same rows at the next chunk -> a0..a3 of the m16n8k(32 bytes) A fragment.
  FASTFA_HOST_DEVICE static void a_address(int lane, int warp_m, int mi, int step, int& row, int& chunk) {
    row = warp_m * 64 + mi * 16 + lane % 16;
    chunk = 2 * step + lane / 16;
  }
  // ... and of B's n8 blocks 2 pair, 2 pair + 1: lanes 0-7 / 8-15 columns 0-7 at chunks
  // 2 step / 2 step + 1 (b0, b1 of block 2 pair); lanes 16-31 columns 8-15 likewise.
  FASTFA_HOST_DEVICE static void b_address(int lane, int warp_n, int pair, int step, int& row, int& chunk) {
    row = warp_n * 32 + pair * 16 + lane % 8 + (lane / 16) * 8;
    chunk = 2 * step + (lane / 8) % 2;
  }
  // The tile (row, column) of accumulator[mi][nj][e] in `lane` of warp (warp_m, warp_n).
  FASTFA_HOST_DEVICE static void accumulator_position(int lane, int warp_m, int warp_n, int mi, int nj, int e,
                                                      int& row, int& col) {
    row = warp_m * 64 + mi * 16 + lane / 4 + 8 * (e / 2);
    col = warp_n * 32 + nj * 8 + (lane % 4) * 2 + e % 2;
  }

  const unsigned char* stages = nullptr;
  // BLoaderFor keeps B K-major for mma.sync, so the layout argument is always false here.
  __device__ void bind(const unsigned char* shared, bool) { stages = shared; }
  __device__ void multiply_stage(int stage) {
    multiply(stages + stage * kStageBytes, stages + stage * kStageBytes + kTileBytes);
  }

  __device__ void multiply(const unsigned char* tile_a, const unsigned char* tile_b) {
    using Op = typename Traits<Element>::Sm80Op;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        int row, chunk;
        a_address(lane, warp_m, mi, step, row, chunk);
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(tile_a + swizzled(row, chunk * 16)), a[mi][0], a[mi][1],
            a[mi][2], a[mi][3]);
      }
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        int row, chunk;
        b_address(lane, warp_n, pair, step, row, chunk);
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(tile_b + swizzled(row, chunk * 16)), b[2 * pair][0],
            b[2 * pair][1], b[2 * pair + 1][0], b[2 * pair + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          float* d = accumulator[mi][nj];
          Op::fma(d[0], d[1], d[2], d[3], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[nj][0], b[nj][1], d[0], d[1],
                  d[2], d[3]);
        }
    }
  }

  template <class Epilogue>
  __device__ void store(const Epilogue& epilogue, int64_t m0, int64_t n0, int64_t split) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const float* d = accumulator[mi][nj];
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          int row, col;
          accumulator_position(lane, warp_m, warp_n, mi, nj, e, row, col);
          epilogue(m0 + row, n0 + col, split, d[e], d[e + 1]);
        }
      }
  }
};

// wgmma: warpgroup g owns rows 64 g.. and all 128 columns.
template <class Element>
struct Sm90Math {
  float accumulator[64];

  // The tile (row, column) of accumulator[i] in thread `thread` of the CTA: i = 4 j + e is
  // (row 16 warp + lane / 4 + 8 (e / 2), column 8 j + 2 (lane % 4) + e % 2) of its warpgroup's slab.
  FASTFA_HOST_DEVICE static void accumulator_position(int thread, int i, int& row, int& col) {
    const int lane = thread % 32, warp = (thread % 128) / 32, group = thread / 128;
    const int j = i / 4, e = i % 4;
    row = group * 64 + warp * 16 + lane / 4 + 8 * (e / 2);
    col = 8 * j + 2 * (lane % 4) + e % 2;
  }

  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < 64; ++i) accumulator[i] = 0.0f;
  }

  // Shared-memory matrix descriptor for a K-major tile with the 128-byte swizzle: start
  // address and strides in 16-byte units; 8-row core-matrix groups lie 1024 bytes apart
  // (stride byte offset); the leading byte offset is unused for swizzled K-major (1).
  // (tests/cuda/gemm_layout_check.cu compares both with CuTe's own GMMA layout and descriptors.)
  __host__ __device__ static uint64_t descriptor_bits(uint32_t address) {
    return ((address & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
  }
  // ... and for an MN-major tile (swizzled_mn): the leading byte offset is the distance between
  // the 64-row atoms (1024 bytes), the stride byte offset that between groups of 8 k (2048).
  __host__ __device__ static uint64_t mn_descriptor_bits(uint32_t address) {
    return ((address & 0x3FFFFu) >> 4) | (uint64_t(1024 >> 4) << 16) | (uint64_t(2048 >> 4) << 32) |
           (uint64_t(1) << 62);
  }
  // The start address advance per wgmma K step (32 bytes of K), in 16-byte units: inside the
  // K-major swizzle atom, or two groups of 8 k in the MN-major tile.
  static constexpr uint64_t kStepK = 2, kStepMn = 2 * 2048 / 16;
  static constexpr bool kMnB = !std::is_void<typename Traits<Element>::Sm90OpMnB>::value;
  __device__ static uint64_t descriptor(const unsigned char* tile) { return descriptor_bits(shared_address(tile)); }

  template <size_t... I>
  __device__ void mma(uint64_t a, uint64_t b, std::index_sequence<I...>) {
    Traits<Element>::Sm90Op::fma(a, b, accumulator[I]...);
  }

  __device__ void fence() {
#pragma unroll
    for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(accumulator[i]);
  }

  // Stage 0's descriptors; a stage's are these plus its offset (the start address field,
  // in 16-byte units, has room for every stage).
  // Held as opaque 32-bit words: left to itself the compiler recomputes them from the shared
  // address on every k-tile (about 15 instructions), to spare two registers.
  uint32_t a_first = 0, b_first = 0, b_high = 0;
  bool b_mn = false;  // B stored MN-major (TileLoader's mn_shared)
  __device__ void bind(const unsigned char* shared, bool b_mn_major) {
    b_mn = kMnB && b_mn_major;
    const uint64_t a = descriptor(shared + (threadIdx.x / 128) * 64 * kRowBytes);
    const uint32_t b_address = shared_address(shared + kTileBytes);
    const uint64_t b = b_mn ? mn_descriptor_bits(b_address) : descriptor_bits(b_address);
    a_first = static_cast<uint32_t>(a);
    b_first = static_cast<uint32_t>(b);
    b_high = static_cast<uint32_t>(b >> 32);
    asm volatile("" : "+r"(a_first), "+r"(b_first), "+r"(b_high));
  }
  __device__ void multiply_stage(int stage) {
    const uint32_t offset = static_cast<uint32_t>(stage) * (kStageBytes >> 4);
    // The start address field (bits 0-13) has room for every stage: no carry into the rest.
    multiply((uint64_t(descriptor_bits(0) >> 32) << 32) | (a_first + offset),
             (uint64_t(b_high) << 32) | (b_first + offset));
  }

  template <class Op, size_t... I>
  __device__ void mma_as(uint64_t a, uint64_t b, std::index_sequence<I...>) {
    Op::fma(a, b, accumulator[I]...);
  }

  // Issues the tile's four wgmmas (one commit group); wait() completes them. A's K steps are
  // 32 bytes further inside the swizzle atom: start address + 2 (16-byte units).
  __device__ void multiply(uint64_t a, uint64_t b) {
    fence();
    cute::warpgroup_arrive();
    if constexpr (kMnB) {
      if (b_mn) {
#pragma unroll
        for (int step = 0; step < kRowBytes / 32; ++step) {
          mma_as<typename Traits<Element>::Sm90OpMnB>(a + kStepK * step, b + kStepMn * step,
                                                       std::make_index_sequence<64>{});
        }
        cute::warpgroup_commit_batch();
        return;
      }
    }
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step) {
      mma(a + kStepK * step, b + kStepK * step, std::make_index_sequence<64>{});
    }
    cute::warpgroup_commit_batch();
  }

  __device__ void wait() {
    cute::warpgroup_wait<0>();
    fence();
  }
  // Completes all but the last tile's wgmmas: the stage they read is free after the next barrier.
  __device__ void wait_for_previous() {
    cute::warpgroup_wait<1>();
    fence();
  }

  template <class Epilogue>
  __device__ void store(const Epilogue& epilogue, int64_t m0, int64_t n0, int64_t split) const {
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
      int row, col;
      accumulator_position(threadIdx.x, i, row, col);
      epilogue(m0 + row, n0 + col, split, accumulator[i], accumulator[i + 1]);
    }
  }
};

// Generic-proxy stores to shared memory become visible to wgmma (the async proxy) only
// through this fence.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// B's loader: MN-major B stays MN-major in shared memory where wgmma can read it so (16-bit).
template <class Arch, class Element, class Transform, class Index>
using BLoaderFor = TileLoader<Element, Transform, Index, false,
                              Arch::kGmma && sizeof(typename Traits<Element>::Bits) == 2>;

// Tiles [first, returned) have every row and K inside for both operands: their loads only
// advance pointers. Only the last tile along K, and CTAs at the edges, take fetch().
template <class ALoader, class BLoader>
FASTFA_HOST_DEVICE int64_t start_interior(ALoader& a, BLoader& b, int64_t k, int64_t m0, int64_t n0, int64_t first,
                                          int64_t end) {
  constexpr int kTileK = ALoader::kTileK;
  if constexpr (!ALoader::kInterior || !BLoader::kInterior) {
    return first;  // the interior path takes both operands: none at all, and no code for it
  } else {
    const bool rows_inside = a.start_interior(m0, first * kTileK) && b.start_interior(n0, first * kTileK);
    const int64_t full_tiles = k / kTileK;
    return rows_inside ? (end < full_tiles ? end : full_tiles) : first;
  }
}

// The global loads of k-tile `tile` into registers (tiles in order along K; `interior` from
// start_interior); the loaders' commit() stores them, or issues the copies, into a stage.
template <class ALoader, class BLoader>
FASTFA_HOST_DEVICE void fetch_tile(ALoader& a, BLoader& b, int64_t tile, int64_t interior, int64_t m0, int64_t n0) {
  if (tile < interior) {
    a.fetch_interior();
    b.fetch_interior();
  } else {
    a.fetch(m0, tile * ALoader::kTileK);
    b.fetch(n0, tile * ALoader::kTileK);
  }
}

// The mainloop's schedule over the k-tiles [first, end), shared by the kernel and the host check
// (tests/cuda/implicit_gemm_check.cu), which so runs the stages in the kernel's order:
//   fetch(tile)          the global loads of a tile into registers (no shared memory);
//   commit(stage, tile)  the fetched tile, transformed, into a stage (or its cp.async issued);
//   end_group()          closes the tile's cp.async group (one per tile, empty or not);
//   synchronize()        the next tile to read is in its stage, for every thread (the barrier);
//   multiply(stage)      issues the MMAs of a stage;
//   retire()             completes all but the last Arch::kMmasInFlight tiles' MMAs.
// Tiles first .. first + kAhead - 1 go into stages 0 .. kAhead - 1 first. Iteration `tile`
// then reads stage tile % kStages and fills stage (tile + kAhead) % kStages, last read by the
// MMAs of tile + kAhead - kStages = tile - 1 - kMmasInFlight: complete before this iteration's
// barrier in every thread (retire() in the iteration before). The loads of tile + kAhead + 1
// are issued right after, so they are in flight across the next barrier.
#pragma nv_exec_check_disable
template <class Arch, class Fetch, class Commit, class EndGroup, class Synchronize, class Multiply, class Retire>
FASTFA_HOST_DEVICE void run_mainloop(int64_t first, int64_t end, Fetch&& fetch, Commit&& commit, EndGroup&& end_group,
                                     Synchronize&& synchronize, Multiply&& multiply, Retire&& retire) {
  constexpr int kStages = Arch::kStages, kAhead = tiles_ahead<Arch>();
#pragma unroll
  for (int stage = 0; stage < kAhead; ++stage) {
    if (first + stage < end) {
      fetch(first + stage);
      commit(stage, first + stage);
    }
    end_group();
  }
  if (first + kAhead < end) {
    fetch(first + kAhead);
  }
  int stage = 0, fill = kAhead % kStages;
  for (int64_t tile = first; tile < end; ++tile) {
    synchronize();
    multiply(stage);
    const int64_t ahead = tile + kAhead;
    if (ahead < end) {
      commit(fill, ahead);
      if (ahead + 1 < end) {
        fetch(ahead + 1);
      }
    }
    end_group();
    retire();
    stage = stage + 1 == kStages ? 0 : stage + 1;
    fill = fill + 1 == kStages ? 0 : fill + 1;
  }
}

// CTAs start in launch order (x fastest). Taken as they come, a wave of 132 CTAs would cover
// up to 132 row tiles of one column of C, reading that many A tiles for one B tile; in groups
// of kRasterGroup row tiles, walked down a group's rows then across its columns (as Triton's
// GROUP_SIZE_M), it covers 8 row tiles x about 16 column tiles: fewer distinct tiles per wave
// to share the L2. A bijection of the grid onto C's tiles (tests/cuda/implicit_gemm_check.cu).
constexpr int64_t kRasterGroup = 8;
FASTFA_HOST_DEVICE void raster(int64_t x, int64_t y, int64_t grid_m, int64_t grid_n, int64_t& tile_m,
                               int64_t& tile_n) {
  const int64_t linear = y * grid_m + x;
  const int64_t span = kRasterGroup * grid_n;  // CTAs per group
  const int64_t group = linear / span, within = linear - group * span;
  const int64_t first_m = group * kRasterGroup;
  const int64_t rows = grid_m - first_m < kRasterGroup ? grid_m - first_m : kRasterGroup;
  tile_m = first_m + within % rows;
  tile_n = within / rows;
}

template <class Arch, class Element, class Gemm, class Transform, class Epilogue>
__device__ __forceinline__ void gemm_body(const Gemm& problem, Transform transform, const Epilogue& epilogue) {
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle is a function of address bits 4-9: tiles start 1024-byte aligned.
  // (Offsetting the pointer, not rounding it as an integer, keeps it a shared-memory pointer.)
  unsigned char* shared = shared_raw + ((1024u - (shared_address(shared_raw) & 1023u)) & 1023u);
  float* row_sums = reinterpret_cast<float*>(shared + Arch::kStages * kStageBytes);

  // Row sums only where A is loaded as it is next to an identity B (grad_weight), so the
  // transform kernels keep their registers.
  constexpr bool kRowSums = Epilogue::kRowSums && Transform::kIdentity;
  using ALoader = TileLoader<Element, IdentityTransform, decltype(problem.a_index), kRowSums>;
  using BLoader = BLoaderFor<Arch, Element, Transform, decltype(problem.b_index)>;
  using Math = std::conditional_t<Arch::kGmma, Sm90Math<Element>, Sm80Math<Element>>;
  constexpr int kTileK = ALoader::kTileK;

  int64_t tile_m, tile_n;
  raster(blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, tile_m, tile_n);
  const int64_t m0 = tile_m * kTileRows, n0 = tile_n * kTileRows;
  const int64_t split = blockIdx.z;
  const bool sums_rows = kRowSums && epilogue.wants_row_sums() && tile_n == 0;
  if (sums_rows && threadIdx.x < kTileRows) {
    row_sums[threadIdx.x] = 0.0f;  // published by the mainloop's first barrier
  }
  transform.prepare();
  const IdentityTransform identity;
  ALoader a_loader(problem.a, nullptr, problem.a_index, threadIdx.x);
  BLoader b_loader(problem.b, transform.stored(), problem.b_index, threadIdx.x);
  Math math;
  math.clear();

  int64_t first, end;
  split_tiles((problem.k + kTileK - 1) / kTileK, problem.k_tiles_per_split, split, first, end);
  const int64_t interior = start_interior(a_loader, b_loader, problem.k, m0, n0, first, end);
  auto fetch = [&](int64_t tile) { fetch_tile(a_loader, b_loader, tile, interior, m0, n0); };
  auto commit = [&](int stage, int64_t tile) {
    unsigned char* tiles = shared + stage * kStageBytes;
    a_loader.commit(tiles, identity, m0, tile * kTileK);
    b_loader.commit(tiles + kTileBytes, transform, n0, tile * kTileK);
  };
  math.bind(shared, b_loader.mn_shared());
  constexpr int kAhead = tiles_ahead<Arch>();
  run_mainloop<Arch>(
      first, end, fetch, commit, [] { commit_async_copies(); },
      [] {
        // This thread's copies of the tile to read done (the kAhead - 1 later groups may still
        // run), its stores made visible to wgmma, and everyone's, by the barrier.
        wait_async_copies<kAhead - 1>();
        if constexpr (Arch::kGmma) fence_shared_for_async_proxy();
        __syncthreads();
      },
      [&](int stage) { math.multiply_stage(stage); },
      [&] {
        if constexpr (Arch::kGmma) math.wait_for_previous();
      });
  // Completes the last wgmmas only on the path that issued them. A CTA with no k-tile (an empty
  // split) reaches the epilogue with the cleared accumulators, and the compiler materialises
  // those zeros as moves on its own path. Were that path to join the mainloop's before this
  // wait, ptxas would see non-wgmma definitions of the accumulators while wgmmas are in flight
  // and serialise every wgmma of the kernel (C7515; the tf32 bodies were, until
  // benchmarks/results/2026-12-01-tf32-wgmma-serialised.md).
  if constexpr (Arch::kGmma) {
    if (first < end) math.wait();
  }

  if (sums_rows) {
    if (first >= end) {
      __syncthreads();  // the zeroing above still needs its barrier
    }
    a_loader.reduce_row_sums(row_sums);
    __syncthreads();
    if (threadIdx.x < kTileRows && m0 + threadIdx.x < problem.m) {
      epilogue.row_sum(m0 + threadIdx.x, split, row_sums[threadIdx.x]);
    }
  }
  math.store(epilogue, m0, n0, split);
}

} // namespace detail

// Each kernel's body exists only for its own architecture (wgmma only on sm_90a; on an
// sm_90a build the mma.sync policy is never launched, so it stays empty there and the
// SASS test sees one tensor-core kind per cubin).
template <class Arch, class Element, class Gemm, class Transform, class Epilogue>
__global__ void __launch_bounds__(detail::kThreads, 1)
    fused_gemm_kernel(const Gemm problem, const Transform transform, const Epilogue epilogue) {
#if defined(__CUDA_ARCH__)
  if constexpr (Arch::kGmma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    detail::gemm_body<Arch, Element>(problem, transform, epilogue);
#endif
  } else {
#if __CUDA_ARCH__ >= 800 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    detail::gemm_body<Arch, Element>(problem, transform, epilogue);
#endif
  }
#endif
}

namespace detail {

template <class Arch, class Element, class Gemm, class Transform, class Epilogue>
cudaError_t launch(const Gemm& problem, const Transform& transform, const Epilogue& epilogue,
                   cudaStream_t stream) {
  if (problem.m == 0 || problem.n == 0) {
    return cudaSuccess;
  }
  constexpr int64_t kTileK = kRowBytes / int64_t(sizeof(typename Traits<Element>::Bits));
  const int64_t grid_m = (problem.m + kTileRows - 1) / kTileRows, grid_n = (problem.n + kTileRows - 1) / kTileRows;
  const int64_t k_tiles = (problem.k + kTileK - 1) / kTileK;
  const int64_t splits = problem.k_tiles_per_split > 0 && k_tiles > 0
                             ? (k_tiles + problem.k_tiles_per_split - 1) / problem.k_tiles_per_split
                             : 1;
  if (grid_m > 0x7FFFFFFF || grid_n > 65535 || splits > 65535) {
    return cudaErrorInvalidValue;
  }
  auto kernel = fused_gemm_kernel<Arch, Element, Gemm, Transform, Epilogue>;
  // More than the default 48 KiB of dynamic shared memory needs the opt-in.
  constexpr int kSharedBytes = shared_bytes<Arch>();
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (status != cudaSuccess) {
    return status;
  }
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, kSharedBytes, stream>>>(problem, transform, epilogue);
  return cudaGetLastError();
}

template <class Element, class Gemm, class Transform, class Epilogue>
cudaError_t launch_for(Arch arch, const Gemm& problem, const Transform& transform, const Epilogue& epilogue,
                       cudaStream_t stream) {
  return arch == Arch::kSm90a ? launch<Sm90Gmma, Element>(problem, transform, epilogue, stream)
                              : launch<Sm80Mma, Element>(problem, transform, epilogue, stream);
}

// C = A T(B)^T for one rule's transform of B: the switch from the runtime rule to the
// transform types, shared by the linear and conv grad_input GEMMs. B used as it is (bp,
// stored R or B) is the identity kernel, instantiated with the other identity ones.
template <class Element, class Gemm, class Epilogue>
cudaError_t transformed_gemm(Arch arch, Rule rule, const Gemm& problem, const FeedbackArgs& feedback,
                             const Epilogue& store, cudaStream_t stream) {
  Epilogue epilogue = store;
  epilogue.output_scale = feedback.output_scale;
  switch (rule) {
  case Rule::kFeedbackAlignment:
    return launch_for<Element>(arch, problem, RuleTransform<Rule::kFeedbackAlignment>{feedback}, epilogue, stream);
  case Rule::kUniformSignSymmetry:
    return launch_for<Element>(arch, problem, RuleTransform<Rule::kUniformSignSymmetry>{feedback}, epilogue,
                               stream);
  case Rule::kBatchRandomSignFeedback:
    return launch_for<Element>(arch, problem, RuleTransform<Rule::kBatchRandomSignFeedback>{feedback}, epilogue,
                               stream);
  case Rule::kFixedRandomSignFeedback:
    return launch_for<Element>(arch, problem, RuleTransform<Rule::kFixedRandomSignFeedback>{feedback}, epilogue,
                               stream);
  default:
    return cudaErrorInvalidValue;
  }
}

using MatrixProblem = GemmProblem<MatrixIndex, MatrixIndex>;

inline MatrixProblem matrix_problem(const Problem& problem) {
  MatrixProblem gemm;
  gemm.m = problem.m;
  gemm.n = problem.n;
  gemm.k = problem.k;
  gemm.a = problem.a.data;
  gemm.a_index = {problem.m, problem.k, problem.a.row_stride, problem.a.k_stride};
  gemm.b = problem.b.data;
  gemm.b_index = {problem.n, problem.k, problem.b.row_stride, problem.b.k_stride};
  return gemm;
}

template <class Element>
StoreEpilogue<Element, MatrixOutput> matrix_store(const Problem& problem) {
  return {problem.c, MatrixOutput{problem.ldc}, problem.m, problem.n, problem.a_row_sums};
}

// C = A B^T with a plain store (and A's row sums): grad_weight, and grad_input for bp.
template <class Element>
cudaError_t store_gemm(Arch arch, const Problem& problem, cudaStream_t stream) {
  return launch_for<Element>(arch, matrix_problem(problem), IdentityTransform{}, matrix_store<Element>(problem),
                             stream);
}

} // namespace detail

template <typename Element>
cudaError_t linear_forward_gemm(Arch arch, const Problem& problem, const LinearEpilogueArgs& epilogue,
                                cudaStream_t stream) {
  const BiasActivationEpilogue<Element, MatrixOutput> store{problem.c, MatrixOutput{problem.ldc}, problem.m,
                                                            problem.n, epilogue};
  return detail::launch_for<Element>(arch, detail::matrix_problem(problem), IdentityTransform{}, store, stream);
}

template <typename Element>
cudaError_t split_gemm(Arch arch, const Problem& problem, float* partial, float* partial_row_sums,
                       int64_t k_tiles_per_split, cudaStream_t stream) {
  auto gemm = detail::matrix_problem(problem);
  gemm.k_tiles_per_split = k_tiles_per_split;
  return detail::launch_for<Element>(arch, gemm, IdentityTransform{},
                                     SplitEpilogue{partial, partial_row_sums, problem.m, problem.n}, stream);
}

template <typename Element>
cudaError_t feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                          cudaStream_t stream) {
  if (rule == Rule::kBackprop) {
    return detail::store_gemm<Element>(arch, problem, stream);
  }
  return detail::transformed_gemm<Element>(arch, rule, detail::matrix_problem(problem), feedback,
                                           detail::matrix_store<Element>(problem), stream);
}

template <typename Element>
cudaError_t split_feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                                float* partial, int64_t k_tiles_per_split, cudaStream_t stream) {
  if (rule == Rule::kBackprop) {
    return split_gemm<Element>(arch, problem, partial, nullptr, k_tiles_per_split, stream);
  }
  auto gemm = detail::matrix_problem(problem);
  gemm.k_tiles_per_split = k_tiles_per_split;
  return detail::transformed_gemm<Element>(arch, rule, gemm, feedback,
                                           SplitEpilogue{partial, nullptr, problem.m, problem.n}, stream);
}

// Splits the instantiations of one element type across files (gemm_<dtype>_*.cu).
#define FASTFA_GEMM_EXTERN_IDENTITY(Element)                                                 \
  extern template cudaError_t detail::store_gemm<Element>(Arch, const Problem&, cudaStream_t); \
  extern template cudaError_t split_gemm<Element>(Arch, const Problem&, float*, float*, int64_t, cudaStream_t);
#define FASTFA_GEMM_INSTANTIATE_IDENTITY(Element)                                                                \
  template cudaError_t linear_forward_gemm<Element>(Arch, const Problem&, const LinearEpilogueArgs&, cudaStream_t); \
  template cudaError_t detail::store_gemm<Element>(Arch, const Problem&, cudaStream_t);                          \
  template cudaError_t split_gemm<Element>(Arch, const Problem&, float*, float*, int64_t, cudaStream_t);
#define FASTFA_GEMM_INSTANTIATE_FEEDBACK(Element)                                                                \
  FASTFA_GEMM_EXTERN_IDENTITY(Element)                                                                           \
  template cudaError_t feedback_gemm<Element>(Arch, Rule, const Problem&, const FeedbackArgs&, cudaStream_t);    \
  template cudaError_t split_feedback_gemm<Element>(Arch, Rule, const Problem&, const FeedbackArgs&, float*,     \
                                                    int64_t, cudaStream_t);

} // namespace gemm
} // namespace fastfa
