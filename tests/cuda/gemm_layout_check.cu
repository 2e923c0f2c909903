// Host-side check of the fused GEMM's shared-memory layout against CuTe's own definitions of
// the hardware's canonical layouts (run by tests/test_sass.py; no GPU needed):
//   - the 128-byte swizzle that the tile loaders write (detail::swizzled) must place element
//     (row, k) where CuTe's GMMA::Layout_K_SW128_Atom, tiled to the 128 x 128-byte tile, puts it;
//   - the wgmma matrix descriptors (Sm90Math::descriptor_bits, + 2 per 32-byte K step,
//     + 64 rows per warpgroup) must equal the ones CuTe's TiledMMA makes for that tile;
//   - likewise for B kept MN-major (swizzled_mn, Sm90Math::mn_descriptor_bits);
//   - the mma.sync path's fragments: the ldmatrix.x4 addresses each lane gives
//     (Sm80Math::a_address / b_address), with ldmatrix's rule for which lane receives which
//     bytes, must put into every register the element CuTe's MMA_Traits ALayout / BLayout
//     assign to that lane and value, at every K step and block of the warp's slab;
//   - the accumulators' tile positions (Sm80Math / Sm90Math::accumulator_position, used by
//     the epilogue) must be the ones CuTe's CLayout gives.
// Prints one line per check and exits non-zero on any mismatch.
#include "../../csrc/cuda/gemm_kernel.cuh"

#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>
#include <cstring>

namespace {

using namespace cute;
using fastfa::gemm::detail::kRowBytes;

template <class T, class Op, class Element>
int check(const char* name) {
  constexpr int kTileK = kRowBytes / int(sizeof(T));
  auto layout = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<128>{}, Int<kTileK>{}));
  alignas(1024) static T tile[128 * kTileK];
  auto shared = make_tensor(make_smem_ptr(tile), layout);
  int failures = 0;
  for (int row = 0; row < 128; ++row) {
    for (int k = 0; k < kTileK; ++k) {
      const auto byte = uint32_t(reinterpret_cast<const char*>(&shared(row, k)) - reinterpret_cast<const char*>(tile));
      if (byte != fastfa::gemm::detail::swizzled(row, k * sizeof(T))) {
        if (failures++ == 0) std::printf("%s: element (%d, %d) at byte %u in CuTe's layout\n", name, row, k, byte);
      }
    }
  }
  auto fragment = make_tiled_mma(Op{}).get_slice(0).make_fragment_A(make_tiled_mma(Op{}).get_slice(0).partition_A(shared));
  // CuTe cannot take a shared-memory address on the host, so start addresses compare as offsets.
  const GmmaDescriptor origin = fragment(0, 0, 0);
  using Math = fastfa::gemm::detail::Sm90Math<Element>;
  if (size<1>(fragment) != 2 || size<2>(fragment) != kRowBytes / 32) {
    std::printf("%s: CuTe splits the tile into (%d, %d) wgmmas, the kernel into (2, %d)\n", name,
                int(size<1>(fragment)), int(size<2>(fragment)), kRowBytes / 32);
    return failures + 1;
  }
  for (int group = 0; group < 2; ++group) {
    for (int step = 0; step < kRowBytes / 32; ++step) {
      GmmaDescriptor theirs = fragment(0, group, step);
      theirs.bitfield.start_address_ = theirs.bitfield.start_address_ - origin.bitfield.start_address_;
      const uint32_t offset = group * 64 * kRowBytes;  // the kernel's warpgroup slab
      const uint64_t ours = Math::descriptor_bits(offset) + 2 * step;
      if (theirs.desc_ != ours) {
        ++failures;
        std::printf("%s: descriptor (warpgroup %d, step %d) is %#llx in CuTe, %#llx in the kernel\n", name, group,
                    step, static_cast<unsigned long long>(theirs.desc_), static_cast<unsigned long long>(ours));
      }
    }
  }
  std::printf("%s: %s\n", name, failures ? "MISMATCH" : "layout and descriptors match CuTe");
  return failures;
}

// B kept MN-major (16-bit): swizzled_mn must place element (row, k) where CuTe's
// GMMA::Layout_MN_SW128_Atom, tiled to the 128-row x 128-byte tile, puts it, and the MN-major
// descriptors (Sm90Math::mn_descriptor_bits, + kStepMn per K step) must be the ones CuTe's
// TiledMMA makes for B of the wgmma with B's transpose bit.
template <class T, class Op, class Element>
int check_mn_major(const char* name) {
  constexpr int kTileK = kRowBytes / int(sizeof(T));
  auto layout = tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, make_shape(Int<128>{}, Int<kTileK>{}));
  alignas(1024) static T tile[128 * kTileK];
  auto shared = make_tensor(make_smem_ptr(tile), layout);
  int failures = 0;
  for (int row = 0; row < 128; ++row) {
    for (int k = 0; k < kTileK; ++k) {
      const auto byte = uint32_t(reinterpret_cast<const char*>(&shared(row, k)) - reinterpret_cast<const char*>(tile));
      if (byte != fastfa::gemm::detail::swizzled_mn(row, k)) {
        if (failures++ == 0) std::printf("%s: element (%d, %d) at byte %u in CuTe's layout\n", name, row, k, byte);
      }
    }
  }
  auto slice = make_tiled_mma(Op{}).get_slice(0);
  auto fragment = slice.make_fragment_B(slice.partition_B(shared));
  const GmmaDescriptor origin = fragment(0, 0, 0);
  using Math = fastfa::gemm::detail::Sm90Math<Element>;
  if (size<1>(fragment) != 1 || size<2>(fragment) != kRowBytes / 32) {
    std::printf("%s: CuTe splits B into (%d, %d) wgmmas, the kernel into (1, %d)\n", name, int(size<1>(fragment)),
                int(size<2>(fragment)), kRowBytes / 32);
    return failures + 1;
  }
  for (int step = 0; step < kRowBytes / 32; ++step) {
    GmmaDescriptor theirs = fragment(0, 0, step);
    theirs.bitfield.start_address_ = theirs.bitfield.start_address_ - origin.bitfield.start_address_;
    const uint64_t ours = Math::mn_descriptor_bits(0) + Math::kStepMn * step;
    if (theirs.desc_ != ours) {
      ++failures;
      std::printf("%s: B descriptor (step %d) is %#llx in CuTe, %#llx in the kernel\n", name, step,
                  static_cast<unsigned long long>(theirs.desc_), static_cast<unsigned long long>(ours));
    }
  }
  std::printf("%s: %s\n", name, failures ? "MISMATCH" : "MN-major layout and descriptors match CuTe");
  return failures;
}

// A tile whose element (row, k) holds its own coordinates, at the loaders' swizzled place.
template <class Bits>
void mark_tile(unsigned char* tile) {
  constexpr int kTileK = kRowBytes / int(sizeof(Bits));
  for (int row = 0; row < 128; ++row)
    for (int k = 0; k < kTileK; ++k)
      *reinterpret_cast<Bits*>(tile + fastfa::gemm::detail::swizzled(row, k * sizeof(Bits))) = Bits(row * kTileK + k);
}

// What ldmatrix.x4 gives `lane` in register j: matrix j's rows are addressed by lanes 8 j ..
// 8 j + 7, and lane t receives the 4 bytes at byte 4 (t % 4) of row t / 4 of each matrix.
template <class Address>
uint32_t ldmatrix_register(const unsigned char* tile, int lane, int j, Address address) {
  int row, chunk;
  address(8 * j + lane / 4, row, chunk);
  uint32_t value;
  std::memcpy(&value, tile + fastfa::gemm::detail::swizzled(row, chunk * 16) + 4 * (lane % 4), 4);
  return value;
}

// The element (row, k) a register's value v holds (16-bit values: two per register).
template <class Bits>
void marked(const uint32_t* registers, int v, int& row, int& k) {
  constexpr int kTileK = kRowBytes / int(sizeof(Bits));
  constexpr int kPerRegister = 4 / int(sizeof(Bits));
  const uint32_t word = registers[v / kPerRegister];
  const uint32_t bits = kPerRegister == 2 ? (v % 2 ? word >> 16 : word & 0xFFFFu) : word;
  row = int(bits) / kTileK;
  k = int(bits) % kTileK;
}

template <class Element, class Bits, class Op>
int check_sm80(const char* name) {
  using Math = fastfa::gemm::detail::Sm80Math<Element>;
  using Traits = MMA_Traits<Op>;
  constexpr int kStepK = 32 / int(sizeof(Bits));  // K elements per mma.sync
  alignas(1024) static unsigned char tile[128 * kRowBytes];
  mark_tile<Bits>(tile);
  int failures = 0;
  for (int warp = 0; warp < 8; ++warp) {
    const int warp_m = warp % 2, warp_n = warp / 2;
    for (int step = 0; step < kRowBytes / 32; ++step) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int mi = 0; mi < 4; ++mi) {  // A: m16 block mi, as the kernel loads it for the operand
          uint32_t a[4];
          for (int j = 0; j < 4; ++j) {
            a[j] = ldmatrix_register(tile, lane, j,
                                     [&](int l, int& r, int& c) { Math::a_address(l, warp_m, mi, step, r, c); });
          }
          for (int v = 0; v < int(size<1>(typename Traits::ALayout{})); ++v) {
            const int index = typename Traits::ALayout{}(lane, v);  // m + 16 k
            int row, k;
            marked<Bits>(a, v, row, k);
            if (row != warp_m * 64 + mi * 16 + index % 16 || k != step * kStepK + index / 16) {
              if (failures++ == 0) std::printf("%s: A lane %d value %d holds (%d, %d)\n", name, lane, v, row, k);
            }
          }
        }
        for (int pair = 0; pair < 2; ++pair) {  // B: n8 blocks 2 pair and 2 pair + 1
          uint32_t b[4];
          for (int j = 0; j < 4; ++j) {
            b[j] = ldmatrix_register(tile, lane, j,
                                     [&](int l, int& r, int& c) { Math::b_address(l, warp_n, pair, step, r, c); });
          }
          for (int block = 0; block < 2; ++block) {
            for (int v = 0; v < int(size<1>(typename Traits::BLayout{})); ++v) {
              const int index = typename Traits::BLayout{}(lane, v);  // n + 8 k
              int row, k;
              marked<Bits>(b + 2 * block, v, row, k);
              if (row != warp_n * 32 + (2 * pair + block) * 8 + index % 8 || k != step * kStepK + index / 8) {
                if (failures++ == 0) std::printf("%s: B lane %d value %d holds (%d, %d)\n", name, lane, v, row, k);
              }
            }
          }
        }
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      for (int mi = 0; mi < 4; ++mi)
        for (int nj = 0; nj < 4; ++nj)
          for (int e = 0; e < 4; ++e) {
            const int index = typename Traits::CLayout{}(lane, e);  // m + 16 n
            int row, col;
            Math::accumulator_position(lane, warp_m, warp_n, mi, nj, e, row, col);
            if (row != warp_m * 64 + mi * 16 + index % 16 || col != warp_n * 32 + nj * 8 + index / 16) {
              if (failures++ == 0) {
                std::printf("%s: accumulator lane %d value %d at (%d, %d)\n", name, lane, e, row, col);
              }
            }
          }
    }
  }
  std::printf("%s: %s\n", name, failures ? "MISMATCH" : "mma.sync fragments and accumulators match CuTe");
  return failures;
}

template <class Element, class Op>
int check_sm90_accumulators(const char* name) {
  using Math = fastfa::gemm::detail::Sm90Math<Element>;
  using CLayout = typename MMA_Traits<Op>::CLayout;  // (thread of the warpgroup, value) -> m + 64 n
  int failures = 0;
  for (int thread = 0; thread < 256; ++thread) {
    for (int i = 0; i < 64; ++i) {
      const int index = CLayout{}(thread % 128, i);
      int row, col;
      Math::accumulator_position(thread, i, row, col);
      if (row != (thread / 128) * 64 + index % 64 || col != index / 64) {
        if (failures++ == 0) std::printf("%s: accumulator %d of thread %d at (%d, %d)\n", name, i, thread, row, col);
      }
    }
  }
  std::printf("%s: %s\n", name, failures ? "MISMATCH" : "wgmma accumulators match CuTe");
  return failures;
}

} // namespace

int main() {
  int failures = check<cutlass::bfloat16_t, SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
                       fastfa::gemm::Bf16>("bf16");
  failures += check<cutlass::half_t, SM90_64x128x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>,
                    fastfa::gemm::Fp16>("fp16");
  failures += check<cutlass::tfloat32_t, SM90_64x128x8_F32TF32TF32_SS_TN<>, fastfa::gemm::Tf32>("tf32");
  failures += check_mn_major<cutlass::bfloat16_t, SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>,
                             fastfa::gemm::Bf16>("bf16 B MN-major");
  failures += check_mn_major<cutlass::half_t, SM90_64x128x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::MN>,
                             fastfa::gemm::Fp16>("fp16 B MN-major");
  failures += check_sm80<fastfa::gemm::Bf16, uint16_t, SM80_16x8x16_F32BF16BF16F32_TN>("bf16 sm80");
  failures += check_sm80<fastfa::gemm::Fp16, uint16_t, SM80_16x8x16_F32F16F16F32_TN>("fp16 sm80");
  failures += check_sm80<fastfa::gemm::Tf32, uint32_t, SM80_16x8x8_F32TF32TF32F32_TN>("tf32 sm80");
  using Bf16Gmma = SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  failures += check_sm90_accumulators<fastfa::gemm::Bf16, Bf16Gmma>("bf16 sm90");
  failures += check_sm90_accumulators<fastfa::gemm::Tf32, SM90_64x128x8_F32TF32TF32_SS_TN<>>("tf32 sm90");
  return failures != 0;
}
