// Shared macros for code compiled both by the host compiler and by nvcc.
#pragma once

#if defined(__CUDACC__)
#define DF_HOST_DEVICE __host__ __device__
#define DF_INLINE __forceinline__
#else
#define DF_HOST_DEVICE
#define DF_INLINE inline
#endif

// A pointer no other pointer of the function aliases: GCC and Clang (and nvcc) spell it __restrict__,
// MSVC __restrict.
#if defined(_MSC_VER) && !defined(__CUDACC__)
#define DF_RESTRICT __restrict
#else
#define DF_RESTRICT __restrict__
#endif
