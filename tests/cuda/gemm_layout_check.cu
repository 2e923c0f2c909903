// Host-side check of the fused GEMM's shared-memory layout against CuTe's own definitions of
// the hardware's canonical layouts (run by tests/test_sass.py; no GPU needed):
//   - the 128-byte swizzle that the tile loaders write (detail::swizzled) must place element
//     (row, k) where CuTe's GMMA::Layout_K_SW128_Atom, tiled to the 128 x 128-byte tile, puts it;
//   - the wgmma matrix descriptors (Sm90Math::descriptor_bits, + 2 per 32-byte K step,
//     + 64 rows per warpgroup) must equal the ones CuTe's TiledMMA makes for that tile.
// Prints one line per mismatch class and exits non-zero on any.
#include "../../csrc/cuda/gemm_kernel.cuh"

#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>

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

} // namespace

int main() {
  int failures = check<cutlass::bfloat16_t, SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
                       fastfa::gemm::Bf16>("bf16");
  failures += check<cutlass::half_t, SM90_64x128x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>,
                    fastfa::gemm::Fp16>("fp16");
  failures += check<cutlass::tfloat32_t, SM90_64x128x8_F32TF32TF32_SS_TN<>, fastfa::gemm::Tf32>("tf32");
  return failures != 0;
}
