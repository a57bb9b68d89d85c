// Shared macros for code compiled both by the host compiler and by nvcc.
#pragma once

#if defined(__CUDACC__)
#define DF_HOST_DEVICE __host__ __device__
#define DF_INLINE __forceinline__
#else
#define DF_HOST_DEVICE
#define DF_INLINE inline
#endif
