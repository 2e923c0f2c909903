// Function multiversioning for the CPU kernels.
#pragma once

// With GCC on x86-64 Linux (ifunc), a function marked FASTFA_AVX2_CLONES is built twice, for AVX2
// and for the baseline, and the loader picks the AVX2 clone where the CPU has it: the wheel's
// baseline flags stay portable while the hot loops get 8-lane vectors.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTFA_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTFA_HAS_AVX2_FMA_KERNELS 1
#else
#define FASTFA_AVX2_CLONES
#define FASTFA_HAS_AVX2_FMA_KERNELS 0
#endif

// A kernel written once over an ISA's vector traits, built per ISA: its wrapper carries the ISA's target
// and GCC's flatten, which inlines the whole kernel, the traits' intrinsics with it, into the wrapper.
// The traits pass vectors by value, so a call left out of line would cross an ABI boundary (-Wpsabi);
// GCC flattens only when optimising, so an unoptimised build has none (sign_conv_grad_input.cpp's
// caller then takes the general path).
#if FASTFA_HAS_AVX2_FMA_KERNELS && defined(__OPTIMIZE__)
#define FASTFA_ISA_KERNEL(isa) __attribute__((target(isa), flatten))
#define FASTFA_HAS_ISA_KERNELS 1
#else
#define FASTFA_HAS_ISA_KERNELS 0
#endif
