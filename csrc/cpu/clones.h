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
