// cpu/avx512_intrinsics.h — <immintrin.h> for the files whose functions are compiled for AVX-512 by a target
// pragma/attribute (the build's baseline is AVX2): nf4_linear_avx512.cpp, fused_kernels_avx512{,bf16}.cpp.
//
// GCC 12 warns "'__Y' may be used uninitialized" inside its own avx512fintrin.h for every
// _mm512_permutexvar_ps / _mm512_cvtepu8_epi32 / _mm512_srli_epi32 / _mm512_reduce_add_ps ... inlined into a
// function compiled with an avx512f target: the intrinsics pass _mm512_undefined_*() as the unused merge
// operand of an unmasked builtin (GCC bug 105593, fixed in GCC 13). Nothing of ours is uninitialized: this
// silences exactly that warning, in these files only, on the compilers that have the bug.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#if !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif
