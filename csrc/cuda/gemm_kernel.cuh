// The fused GEMM template of the cuda backend (declared in fastfa/gemm.h).
//
// One kernel, C = A B^T, for every pass of a linear layer and every rule:
//   forward      A = x,        B = W,      epilogue bias + activation
//   grad_input   A = delta,    B = T(W),   the rule's transform applied to B's tiles
//   grad_weight  A = delta^T,  B = x^T,    A's row sums give grad_bias
// The rule enters only through the Transform functor, applied to each B element between
// the global load and the shared-memory store; bias, activation and grad_bias ride along
// in the epilogue / loader. Instantiations live in gemm_<dtype>_*.cu, one small file each,
// so a build with MAX_JOBS cores compiles them in parallel.
//
// Data path (both architectures): 256 threads load a 128-row x 128-byte tile of A and of B
// from global memory into registers, transform and round them (bf16 / fp16, or fp32 to
// tf32), and store them K-major into shared memory with the 128-byte swizzle that wgmma
// reads natively. Two shared stages: the loads of tile k+1 are issued before the MMAs of
// tile k and stored after them, so the global latency and the transform's arithmetic (a
// Philox draw for brsf) overlap the tensor cores. Staging through registers, rather than
// cp.async / TMA, is what lets an arbitrary elementwise transform sit in the data path and
// lets any operand layout (K- or row-contiguous) land in the one K-major layout that
// every MMA here wants (tf32 wgmma exists only K-major).
//   sm_90a: two warpgroups, each a 64x128 slab with wgmma.m64n128 (SS: both operands from
//           shared memory through matrix descriptors), 64 fp32 accumulators per thread.
//   sm_80+: eight warps in 2x4, each a 64x32 slab with mma.sync.m16n8 fed by ldmatrix.
// Each K step of either MMA consumes 32 bytes of every row (k16 for 16-bit types, k8 for
// tf32), so one 128-byte tile row is four steps for every dtype.
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
#include <type_traits>
#include <utility>

namespace fastfa {
namespace gemm {

// The architecture policies; their names appear in the kernels' symbols, which is how
// tests/test_sass.py tells which tensor-core instruction each kernel must contain.
struct Sm80Mma {
  static constexpr bool kGmma = false;
};
struct Sm90Gmma {
  static constexpr bool kGmma = true;
};

namespace detail {

constexpr int kThreads = 256;
constexpr int kTileRows = 128;  // rows of A (M) and of B (N) per CTA
constexpr int kRowBytes = 128;  // bytes of K per tile row: the width of the 128-byte swizzle
constexpr int kTileBytes = kTileRows * kRowBytes;
constexpr int kStageBytes = 2 * kTileBytes;  // A and B
constexpr int kStages = 2;
constexpr int kVectorsPerThread = kTileBytes / (16 * kThreads);  // 16-byte vectors: 4
constexpr int kSharedBytes = kStages * kStageBytes + kTileRows * int(sizeof(float)) + 1024;  // + row sums, alignment

static_assert(kVectorsPerThread == 4, "tile geometry");

// Byte offset of (row, byte) in a K-major tile with the 128-byte swizzle (Swizzle<3,4,3>):
// the 16-byte chunk index is XORed with row % 8, so the eight rows of a core matrix hit
// distinct banks, for ldmatrix and for wgmma's descriptors (layout type SWIZZLE_128B).
__host__ __device__ __forceinline__ uint32_t swizzled(uint32_t row, uint32_t byte) {
  const uint32_t offset = row * kRowBytes + byte;
  return offset ^ ((offset >> 3) & 0x70u);
}

template <class Element>
struct Traits;

template <>
struct Traits<Bf16> {
  using Bits = uint16_t;
  using Sm80Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                 cute::SM90::GMMA::Major::K>;
  __device__ static float to_float(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  __device__ static Bits operand(float x) { return __bfloat16_as_ushort(__float2bfloat16(x)); }
  __device__ static Bits output(float x) { return operand(x); }
  __device__ static Bits operand_bits(Bits b) { return b; }
};

template <>
struct Traits<Fp16> {
  using Bits = uint16_t;
  using Sm80Op = cute::SM80_16x8x16_F32F16F16F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                               cute::SM90::GMMA::Major::K>;
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits operand(float x) { return __half_as_ushort(__float2half(x)); }
  __device__ static Bits output(float x) { return operand(x); }
  __device__ static Bits operand_bits(Bits b) { return b; }
};

template <>
struct Traits<Tf32> {
  using Bits = uint32_t;
  using Sm80Op = cute::SM80_16x8x8_F32TF32TF32F32_TN;
  using Sm90Op = cute::SM90::GMMA::MMA_64x128x8_F32TF32TF32_SS_TN<>;
  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  // Round to nearest (ties away), as cuBLAS's tf32 path does, rather than letting the
  // tensor core truncate the low mantissa bits.
  __device__ static Bits operand(float x) {
    uint32_t bits;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
    return bits;
  }
  __device__ static Bits output(float x) { return __float_as_uint(x); }  // outputs stay fp32
  __device__ static Bits operand_bits(Bits b) { return operand(__uint_as_float(b)); }
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
  __device__ void prepare() {}
  __device__ const void* stored() const { return nullptr; }
};

// B = T(W) for one rule, from feedback.h's feedback_transform (the formula every backend
// shares): usf, brsf, frsf, and fa regenerating R from (seed, step).
template <Rule kRule>
struct RuleTransform {
  static constexpr bool kIdentity = false;
  static constexpr bool kReadsWeight = kRule != Rule::kFeedbackAlignment;  // drawn fa is R alone
  static constexpr bool kReadsStored = kRule == Rule::kFixedRandomSignFeedback;
  static constexpr bool kDraws = kRule == Rule::kBatchRandomSignFeedback || kRule == Rule::kFeedbackAlignment;
  FeedbackArgs args;
  uint64_t seed = 0, step = 0;

  // [seed, step] is read on the device, so a step counter living on the GPU costs no
  // host synchronisation (as in the transform kernel).
  __device__ void prepare() {
    if constexpr (kDraws) {
      seed = static_cast<uint64_t>(args.rng[0]);
      step = static_cast<uint64_t>(args.rng[1]);
    }
  }
  __device__ const void* stored() const { return kReadsStored ? args.stored : nullptr; }
  __device__ float operator()(float w, float stored, float xi) const {
    // As feedback_transform_kernel: R is the stored tensor, or scale * xi when drawn.
    const float r = kReadsStored ? stored : args.scale * xi;
    return feedback_transform<float>(kRule, w, r, xi, args.scale);
  }
};

// ---- Epilogues ------------------------------------------------------------------------

template <class Element>
struct StoreEpilogue {
  using Bits = typename detail::Traits<Element>::Bits;
  // (row, col) and (row, col + 1); col is even.
  __device__ void operator()(const Problem& problem, int64_t row, int64_t col, float v0, float v1) const {
    if (row >= problem.m || col >= problem.n) {
      return;
    }
    Bits* c = static_cast<Bits*>(problem.c) + row * problem.ldc + col;
    const Bits b0 = detail::Traits<Element>::output(v0), b1 = detail::Traits<Element>::output(v1);
    if (col + 1 < problem.n) {
      if ((problem.ldc & 1) == 0 && (reinterpret_cast<uintptr_t>(c) % (2 * sizeof(Bits))) == 0) {
        if constexpr (sizeof(Bits) == 2) {
          *reinterpret_cast<uint32_t*>(c) = uint32_t(b0) | (uint32_t(b1) << 16);
        } else {
          *reinterpret_cast<uint2*>(c) = make_uint2(b0, b1);
        }
      } else {
        c[0] = b0;
        c[1] = b1;
      }
    } else {
      c[0] = b0;
    }
  }
};

__device__ __forceinline__ float activate(Activation activation, float z) {
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

// The linear forward: r = acc, z = r + b, output = act(z); z kept for gelu / silu, r for aa / ia.
template <class Element>
struct LinearEpilogue {
  using Bits = typename detail::Traits<Element>::Bits;
  LinearEpilogueArgs args;
  __device__ void operator()(const Problem& problem, int64_t row, int64_t col, float v0, float v1) const {
    if (row >= problem.m) {
      return;
    }
    const float values[2] = {v0, v1};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (col + j >= problem.n) {
        break;
      }
      const int64_t at = row * problem.ldc + col + j;
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
      static_cast<Bits*>(problem.c)[at] = detail::Traits<Element>::output(activate(args.activation, z));
    }
  }
};

namespace detail {

// feedback.h's unit_draw (uniform) for an index not known at compile time. unit_draw picks
// the word with words[index % 4], a runtime index into an array, which the compiler puts in
// local memory; here selects pick it from registers, and the bits are the same.
__device__ __forceinline__ float unit_draw_in_registers(uint64_t seed, uint64_t step, uint64_t index,
                                                        Distribution distribution) {
  const Philox4x32 bits = draw_block(seed, step, index >> 2);
  const uint32_t lane = static_cast<uint32_t>(index & 3u);
  const uint32_t word = lane == 0 ? bits.x0 : lane == 1 ? bits.x1 : lane == 2 ? bits.x2 : bits.x3;
  return unit_from_words(&word, 0u, distribution);
}

// ---- Loading a tile: global -> registers -> (transform) -> swizzled shared memory --------

template <class Element, class Transform, bool kRowSums>
struct TileLoader {
  using Bits = typename Traits<Element>::Bits;
  static constexpr int kVector = 16 / int(sizeof(Bits));     // elements per 16-byte vector
  static constexpr int kTileK = kRowBytes / int(sizeof(Bits));  // K elements per tile
  union Pack {
    uint4 vector;
    Bits element[kVector];
  };

  const Bits* data;
  const Bits* stored;
  int64_t rows, k_extent, row_stride, k_stride;
  bool k_contiguous, vector_ok;
  uint4 raw[kVectorsPerThread];
  uint4 raw_stored[Transform::kReadsStored ? kVectorsPerThread : 1];
  float row_sum[kRowSums ? kVectorsPerThread : 1][kRowSums ? kVector : 1];

  __device__ TileLoader(const Operand& operand, const void* stored_data, int64_t rows_, int64_t k_extent_)
      : data(static_cast<const Bits*>(operand.data)), stored(static_cast<const Bits*>(stored_data)), rows(rows_),
        k_extent(k_extent_), row_stride(operand.row_stride), k_stride(operand.k_stride) {
    k_contiguous = k_stride == 1;
    const int64_t leading = k_contiguous ? row_stride : k_stride;
    // 16-byte vectors need a 16-byte aligned base and a leading stride in whole vectors.
    vector_ok = (reinterpret_cast<uintptr_t>(data) % 16) == 0 && leading % kVector == 0 &&
                (!Transform::kReadsStored || (reinterpret_cast<uintptr_t>(stored) % 16) == 0);
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

  // Tile-local (row, k) of vector v's first element. K-contiguous operands: a warp covers
  // four rows of eight 16-byte chunks (coalesced 128-byte rows, conflict-free swizzled
  // stores). Row-contiguous operands: a warp covers 32 consecutive k of one row vector, so
  // its element-wise stores into the K-major tile fall in distinct banks.
  __device__ void coordinates(int v, int& row, int& k) const {
    const int flat = int(threadIdx.x) + v * kThreads;
    if (k_contiguous) {
      row = flat / (kRowBytes / 16);
      k = (flat % (kRowBytes / 16)) * kVector;
    } else {
      k = flat % kTileK;
      row = (flat / kTileK) * kVector;
    }
  }

  __device__ bool inside(int64_t row, int64_t k, int i) const {
    return k_contiguous ? (row < rows && k + i < k_extent) : (row + i < rows && k < k_extent);
  }

  // Issues the global loads of the tile at (row0, k0); out-of-range elements read as zero.
  __device__ void fetch(int64_t row0, int64_t k0) {
#pragma unroll
    for (int v = 0; v < kVectorsPerThread; ++v) {
      int row, k;
      coordinates(v, row, k);
      const int64_t grow = row0 + row, gk = k0 + k;
      const int64_t offset = grow * row_stride + gk * k_stride;
      const bool full = inside(grow, gk, kVector - 1) && inside(grow, gk, 0);
      Pack w, r;
      w.vector = make_uint4(0, 0, 0, 0);
      r.vector = make_uint4(0, 0, 0, 0);
      if (vector_ok && full) {
        if constexpr (Transform::kReadsWeight) {
          w.vector = __ldg(reinterpret_cast<const uint4*>(data + offset));
        }
        if constexpr (Transform::kReadsStored) {
          r.vector = __ldg(reinterpret_cast<const uint4*>(stored + offset));
        }
      } else {
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          if (inside(grow, gk, i)) {
            if constexpr (Transform::kReadsWeight) {
              w.element[i] = data[offset + i];
            }
            if constexpr (Transform::kReadsStored) {
              r.element[i] = stored[offset + i];
            }
          }
        }
      }
      raw[v] = w.vector;
      if constexpr (Transform::kReadsStored) {
        raw_stored[v] = r.vector;
      }
    }
  }

  // Transforms the fetched tile and stores it, K-major and swizzled, at `tile`.
  __device__ void commit(unsigned char* tile, const Transform& transform, int64_t row0, int64_t k0) {
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
      } else {
        const int64_t grow = row0 + row, gk = k0 + k;
        // The vector's elements are consecutive in memory (its direction has stride 1), so
        // their draws share Philox blocks when the first one starts a block.
        const uint64_t offset = static_cast<uint64_t>(grow * row_stride + gk * k_stride);
        float xi[kVector];
        if constexpr (Transform::kDraws) {
          // Uniform draws only: a normal draw's sinf / cosf keep a local-memory array for
          // their (never taken here) huge-argument path, and linear layers draw uniformly;
          // the host materialises normally drawn B with the transform kernel instead.
          if ((offset & 3u) == 0) {
#pragma unroll
            for (int j = 0; j < kVector / 4; ++j) {
              const Philox4x32 bits = draw_block(transform.seed, transform.step, (offset >> 2) + j);
              const uint32_t words[4] = {bits.x0, bits.x1, bits.x2, bits.x3};
#pragma unroll
              for (int lane = 0; lane < 4; ++lane) {
                xi[4 * j + lane] = unit_from_words(words, uint32_t(lane), Distribution::kUniform);
              }
            }
          } else {
#pragma unroll
            for (int i = 0; i < kVector; ++i) {
              xi[i] = unit_draw_in_registers(transform.seed, transform.step, offset + i, Distribution::kUniform);
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
          // Outside the matrix B must be zero (a drawn R is not), so the K tail adds nothing.
          const float b = inside(grow, gk, i) ? transform(w, r, xi[i]) : 0.0f;
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
      if (k_contiguous) {
        *reinterpret_cast<uint4*>(tile + swizzled(row, k * sizeof(Bits))) = out.vector;
      } else {
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          *reinterpret_cast<Bits*>(tile + swizzled(row + i, k * sizeof(Bits))) = out.element[i];
        }
      }
    }
  }

  // Adds this thread's row sums into sums[tile row] (shared memory).
  __device__ void reduce_row_sums(float* sums) const {
    if constexpr (kRowSums) {
#pragma unroll
      for (int v = 0; v < kVectorsPerThread; ++v) {
        int row, k;
        coordinates(v, row, k);
        if (k_contiguous) {
          atomicAdd(&sums[row], row_sum[v][0]);
        } else {
#pragma unroll
          for (int i = 0; i < kVector; ++i) {
            atomicAdd(&sums[row + i], row_sum[v][i]);
          }
        }
      }
    }
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

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

  __device__ void multiply(const unsigned char* tile_a, const unsigned char* tile_b) {
    using Op = typename Traits<Element>::Sm80Op;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // ldmatrix.x4: lanes 0-15 address rows 0-15 of the m16 block at chunk 2 step,
        // lanes 16-31 the same rows at the next chunk -> a0..a3 of the m16n8k(32 bytes) A fragment.
        const int row = warp_m * 64 + mi * 16 + lane % 16;
        const int chunk = 2 * step + lane / 16;
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(tile_a + swizzled(row, chunk * 16)), a[mi][0], a[mi][1],
            a[mi][2], a[mi][3]);
      }
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        // Lanes 0-7 / 8-15: columns 0-7 at chunks 2 step / 2 step + 1 (b0, b1 of block 2 pair);
        // lanes 16-31: columns 8-15 likewise (block 2 pair + 1).
        const int row = warp_n * 32 + pair * 16 + lane % 8 + (lane / 16) * 8;
        const int chunk = 2 * step + (lane / 8) % 2;
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
  __device__ void store(const Problem& problem, const Epilogue& epilogue, int64_t m0, int64_t n0) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp % 2, warp_n = warp / 2;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const int64_t row = m0 + warp_m * 64 + mi * 16 + lane / 4;
        const int64_t col = n0 + warp_n * 32 + nj * 8 + (lane % 4) * 2;
        const float* d = accumulator[mi][nj];
        epilogue(problem, row, col, d[0], d[1]);
        epilogue(problem, row + 8, col, d[2], d[3]);
      }
  }
};

// wgmma: warpgroup g owns rows 64 g.. and all 128 columns; accumulator[4 j + e] is
// (row 16 warp + lane / 4 + 8 (e / 2), column 8 j + 2 (lane % 4) + e % 2).
template <class Element>
struct Sm90Math {
  float accumulator[64];

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
  __device__ static uint64_t descriptor(const unsigned char* tile) { return descriptor_bits(shared_address(tile)); }

  template <size_t... I>
  __device__ void mma(uint64_t a, uint64_t b, std::index_sequence<I...>) {
    Traits<Element>::Sm90Op::fma(a, b, accumulator[I]...);
  }

  __device__ void fence() {
#pragma unroll
    for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(accumulator[i]);
  }

  // Issues the tile's four wgmmas (one commit group); wait() completes them.
  __device__ void multiply(const unsigned char* tile_a, const unsigned char* tile_b) {
    const int group = threadIdx.x / 128;
    const uint64_t a = descriptor(tile_a + group * 64 * kRowBytes), b = descriptor(tile_b);
    fence();
    cute::warpgroup_arrive();
#pragma unroll
    for (int step = 0; step < kRowBytes / 32; ++step) {
      // 32 bytes further along K inside the swizzle atom: start address + 2 (16-byte units).
      mma(a + 2 * step, b + 2 * step, std::make_index_sequence<64>{});
    }
    cute::warpgroup_commit_batch();
  }

  __device__ void wait() {
    cute::warpgroup_wait<0>();
    fence();
  }

  template <class Epilogue>
  __device__ void store(const Problem& problem, const Epilogue& epilogue, int64_t m0, int64_t n0) const {
    const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32, group = threadIdx.x / 128;
    const int64_t row = m0 + group * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int64_t col = n0 + 8 * j + (lane % 4) * 2;
      epilogue(problem, row, col, accumulator[4 * j], accumulator[4 * j + 1]);
      epilogue(problem, row + 8, col, accumulator[4 * j + 2], accumulator[4 * j + 3]);
    }
  }
};

// Generic-proxy stores to shared memory become visible to wgmma (the async proxy) only
// through this fence.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <class Arch, class Element, class Transform, class Epilogue>
__device__ __forceinline__ void gemm_body(const Problem& problem, Transform transform, const Epilogue& epilogue) {
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle is a function of address bits 4-9: tiles start 1024-byte aligned.
  unsigned char* shared = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  float* row_sums = reinterpret_cast<float*>(shared + kStages * kStageBytes);

  constexpr bool kRowSums = Transform::kIdentity && std::is_same<Epilogue, StoreEpilogue<Element>>::value;
  using ALoader = TileLoader<Element, IdentityTransform, kRowSums>;
  using BLoader = TileLoader<Element, Transform, false>;
  using Math = std::conditional_t<Arch::kGmma, Sm90Math<Element>, Sm80Math<Element>>;
  constexpr int kTileK = ALoader::kTileK;

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const bool sums_rows = kRowSums && problem.a_row_sums != nullptr && blockIdx.y == 0;
  if (sums_rows && threadIdx.x < kTileRows) {
    row_sums[threadIdx.x] = 0.0f;  // published by the barrier after the first tile
  }
  transform.prepare();
  const IdentityTransform identity;
  ALoader a_loader(problem.a, nullptr, problem.m, problem.k);
  BLoader b_loader(problem.b, transform.stored(), problem.n, problem.k);
  Math math;
  math.clear();

  const int64_t k_tiles = (problem.k + kTileK - 1) / kTileK;
  if (k_tiles > 0) {
    a_loader.fetch(m0, 0);
    b_loader.fetch(n0, 0);
    a_loader.commit(shared, identity, m0, 0);
    b_loader.commit(shared + kTileBytes, transform, n0, 0);
    if constexpr (Arch::kGmma) fence_shared_for_async_proxy();
    __syncthreads();
    for (int64_t tile = 0; tile < k_tiles; ++tile) {
      unsigned char* stage = shared + (tile & 1) * kStageBytes;
      unsigned char* next = shared + ((tile + 1) & 1) * kStageBytes;
      const bool has_next = tile + 1 < k_tiles;
      const int64_t k_next = (tile + 1) * kTileK;
      if (has_next) {
        a_loader.fetch(m0, k_next);
        b_loader.fetch(n0, k_next);
      }
      math.multiply(stage, stage + kTileBytes);
      if (has_next) {
        // The other stage was last read by the MMAs of tile - 1, completed before the barrier.
        a_loader.commit(next, identity, m0, k_next);
        b_loader.commit(next + kTileBytes, transform, n0, k_next);
      }
      if constexpr (Arch::kGmma) {
        math.wait();
        fence_shared_for_async_proxy();
      }
      __syncthreads();
    }
  }

  if (sums_rows) {
    if (k_tiles == 0) {
      __syncthreads();  // the zeroing above still needs its barrier
    }
    a_loader.reduce_row_sums(row_sums);
    __syncthreads();
    if (threadIdx.x < kTileRows && m0 + threadIdx.x < problem.m) {
      static_cast<typename Traits<Element>::Bits*>(problem.a_row_sums)[m0 + threadIdx.x] =
          Traits<Element>::output(row_sums[threadIdx.x]);
    }
  }
  math.store(problem, epilogue, m0, n0);
}

} // namespace detail

// Each kernel's body exists only for its own architecture (wgmma only on sm_90a; on an
// sm_90a build the mma.sync policy is never launched, so it stays empty there and the
// SASS test sees one tensor-core kind per cubin).
template <class Arch, class Element, class Transform, class Epilogue>
__global__ void __launch_bounds__(detail::kThreads, 1)
    fused_gemm_kernel(const Problem problem, const Transform transform, const Epilogue epilogue) {
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

template <class Arch, class Element, class Transform, class Epilogue>
cudaError_t launch(const Problem& problem, const Transform& transform, const Epilogue& epilogue,
                   cudaStream_t stream) {
  if (problem.m == 0 || problem.n == 0) {
    return cudaSuccess;
  }
  const int64_t grid_m = (problem.m + kTileRows - 1) / kTileRows, grid_n = (problem.n + kTileRows - 1) / kTileRows;
  if (grid_m > 0x7FFFFFFF || grid_n > 65535) {
    return cudaErrorInvalidValue;
  }
  auto kernel = fused_gemm_kernel<Arch, Element, Transform, Epilogue>;
  // More than the default 48 KiB of dynamic shared memory needs the opt-in.
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (status != cudaSuccess) {
    return status;
  }
  kernel<<<dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n)), kThreads, kSharedBytes, stream>>>(
      problem, transform, epilogue);
  return cudaGetLastError();
}

template <class Element, class Transform, class Epilogue>
cudaError_t launch_for(Arch arch, const Problem& problem, const Transform& transform, const Epilogue& epilogue,
                       cudaStream_t stream) {
  return arch == Arch::kSm90a ? launch<Sm90Gmma, Element>(problem, transform, epilogue, stream)
                              : launch<Sm80Mma, Element>(problem, transform, epilogue, stream);
}

// C = A T(B)^T with a plain store: grad_input (every transform) and grad_weight (identity).
template <class Element, class Transform>
cudaError_t store_gemm(Arch arch, const Problem& problem, const Transform& transform, cudaStream_t stream) {
  return launch_for<Element>(arch, problem, transform, StoreEpilogue<Element>{}, stream);
}

} // namespace detail

template <typename Element>
cudaError_t linear_forward_gemm(Arch arch, const Problem& problem, const LinearEpilogueArgs& epilogue,
                                cudaStream_t stream) {
  return detail::launch_for<Element>(arch, problem, IdentityTransform{}, LinearEpilogue<Element>{epilogue}, stream);
}

template <typename Element>
cudaError_t feedback_gemm(Arch arch, Rule rule, const Problem& problem, const FeedbackArgs& feedback,
                          cudaStream_t stream) {
  switch (rule) {
  case Rule::kBackprop:
    return detail::store_gemm<Element>(arch, problem, IdentityTransform{}, stream);
  case Rule::kFeedbackAlignment:
    return detail::store_gemm<Element>(arch, problem, RuleTransform<Rule::kFeedbackAlignment>{feedback}, stream);
  case Rule::kUniformSignSymmetry:
    return detail::store_gemm<Element>(arch, problem, RuleTransform<Rule::kUniformSignSymmetry>{feedback}, stream);
  case Rule::kBatchRandomSignFeedback:
    return detail::store_gemm<Element>(arch, problem, RuleTransform<Rule::kBatchRandomSignFeedback>{feedback},
                                       stream);
  case Rule::kFixedRandomSignFeedback:
    return detail::store_gemm<Element>(arch, problem, RuleTransform<Rule::kFixedRandomSignFeedback>{feedback},
                                       stream);
  default:
    return cudaErrorInvalidValue;
  }
}

// Splits the instantiations of one element type across files (gemm_<dtype>_*.cu).
#define FASTFA_GEMM_EXTERN_IDENTITY(Element)                                                                     \
  extern template cudaError_t detail::store_gemm<Element, IdentityTransform>(Arch, const Problem&,                \
                                                                             const IdentityTransform&, cudaStream_t);
#define FASTFA_GEMM_INSTANTIATE_IDENTITY(Element)                                                                \
  template cudaError_t linear_forward_gemm<Element>(Arch, const Problem&, const LinearEpilogueArgs&, cudaStream_t); \
  template cudaError_t detail::store_gemm<Element, IdentityTransform>(Arch, const Problem&,                       \
                                                                      const IdentityTransform&, cudaStream_t);
#define FASTFA_GEMM_INSTANTIATE_FEEDBACK(Element)                                                                \
  FASTFA_GEMM_EXTERN_IDENTITY(Element)                                                                           \
  template cudaError_t feedback_gemm<Element>(Arch, Rule, const Problem&, const FeedbackArgs&, cudaStream_t);

} // namespace gemm
} // namespace fastfa
