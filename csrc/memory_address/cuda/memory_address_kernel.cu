// CUDA kernels of defect_fast::memory_address (see memory_address_kernel.h for the contract).
//
// Layout: one thread block per query row for the row passes (a row is N <= a few thousand
// values, re-read from L1/L2 by each phase instead of being staged in shared memory, so any N
// works), one warp per row for the normalisation kernels. Reductions are fixed-order
// (warp shuffles, then the warps in order): results are deterministic, and there are no atomics.
#include <cmath>

#include "memory_address/cuda/memory_address_kernel.h"
#include "memory_address/memory_address_math.h"

namespace defect_fast {
namespace memory_address {
namespace cuda {
namespace {

constexpr int kRowBlock = 256;     // threads per block of the row passes
constexpr int kWarpsPerBlock = 8;  // rows per block of the normalisation kernels
constexpr int64_t kMaxGrid = 65535;
// block_allreduce keeps one slot per warp and reads blockDim.x / 32 of them: whole warps, at most 32
static_assert(kRowBlock % 32 == 0 && kRowBlock <= 1024, "kRowBlock: a multiple of 32, at most 1024");

// Loads and stores between the storage type and acc_t (explicit: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__).
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half(x); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Reduction over the block, result in every thread. smem: one slot per warp. Fixed order.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* smem) {
  v = warp_allreduce(v, op);
  __syncthreads();  // the previous call's readers are done with smem
  if ((threadIdx.x & 31) == 0) {
    smem[threadIdx.x >> 5] = v;
  }
  __syncthreads();
  T r = smem[0];
  const int warps = blockDim.x >> 5;
  for (int w = 1; w < warps; ++w) {
    r = op(r, smem[w]);
  }
  return r;
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// ---- normalize_rows: one warp per row ----
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    normalize_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ xn, acc_t<scalar_t>* norms,
                          bool compute_norms, int64_t rows, int64_t cols) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += warps) {
    const scalar_t* xr = x + r * cols;
    acc norm;
    if (compute_norms) {
      // 1. |x_r|.
      acc s = 0;
      for (int64_t c = lane; c < cols; c += 32) {
        const acc v = to_acc(xr[c]);
        s += v * v;
      }
      norm = sqrt(warp_allreduce(s, SumOp{}));
      if (lane == 0) {
        norms[r] = norm;
      }
    } else {
      norm = norms[r];
    }
    // 2. x / max(|x|, eps), as F.normalize.
    const acc eps = static_cast<acc>(kNormEps);
    const acc den = norm > eps ? norm : eps;
    scalar_t* outr = xn + r * cols;
    for (int64_t c = lane; c < cols; c += 32) {
      outr[c] = Store<scalar_t>::from(to_acc(xr[c]) / den);
    }
  }
}

// ---- forward_rows: one block per query row ----
template <typename scalar_t>
__global__ void __launch_bounds__(kRowBlock)
    forward_rows_kernel(const scalar_t* cosines, scalar_t* weights, acc_t<scalar_t>* probs,
                        acc_t<scalar_t>* w_norm, int64_t B, int64_t N, acc_t<scalar_t> t,
                        acc_t<scalar_t> temperature, int p) {
  using acc = acc_t<scalar_t>;
  __shared__ acc smem[kRowBlock / 32];
  const bool do_shrink = t > acc(0);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const scalar_t* crow = cosines + b * N;
    scalar_t* wrow = weights + b * N;
    acc* prow = probs != nullptr ? probs + b * N : nullptr;

    // 1. Maximum logit s_n = cos_n / temperature.
    acc mx = neg_inf<acc>();
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc s = to_acc(crow[n]) / temperature;
      mx = s > mx ? s : mx;
    }
    mx = block_allreduce(mx, MaxOp{}, smem);

    // 2. Softmax denominator.
    acc sum = 0;
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      sum += exp(to_acc(crow[n]) / temperature - mx);
    }
    sum = block_allreduce(sum, SumOp{}, smem);
    const acc inv_sum = acc(1) / sum;

    // 3. Softmax (saved for the backward pass), shrinkage and ||w'||_p^p.
    acc pacc = 0;
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc w = exp(to_acc(crow[n]) / temperature - mx) * inv_sum;
      if (prow != nullptr) {
        prow[n] = w;
      }
      pacc += pnorm_term(do_shrink ? shrink(w, t) : w, p);
    }
    pacc = block_allreduce(pacc, SumOp{}, smem);
    const acc norm = pnorm_finish(pacc, p);
    if (threadIdx.x == 0) {
      w_norm[b] = norm;
    }
    const acc inv = inv_clamped_norm(norm);

    // 4. w'' = w' / max(||w'||_p, eps). Each thread rewrites only the entries it read, after
    // the barrier inside block_allreduce, so weights may alias cosines.
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc w = prow != nullptr ? prow[n] : exp(to_acc(crow[n]) / temperature - mx) * inv_sum;
      wrow[n] = Store<scalar_t>::from((do_shrink ? shrink(w, t) : w) * inv);
    }
  }
}

// dL/dw_n (the softmax output) from the total dL/dw''_n, per element.
template <typename acc>
__device__ __forceinline__ acc grad_probs(acc g2, acc pr, acc dot1, acc inv, acc t, bool do_shrink, int p,
                                          bool passes) {
  const acc w2 = (do_shrink ? shrink(pr, t) : pr) * inv;
  acc g = renorm_grad(g2, w2, dot1, inv, p, passes);
  if (do_shrink) {
    g *= shrink_grad(pr, t);
  }
  return g;
}

// ---- backward_rows: one block per query row ----
template <typename scalar_t>
__global__ void __launch_bounds__(kRowBlock)
    backward_rows_kernel(const scalar_t* g_readout, const scalar_t* __restrict__ g_weights,
                         const acc_t<scalar_t>* __restrict__ probs, const acc_t<scalar_t>* __restrict__ w_norm,
                         scalar_t* h, int64_t B, int64_t N, acc_t<scalar_t> t, acc_t<scalar_t> temperature, int p) {
  using acc = acc_t<scalar_t>;
  __shared__ acc smem[kRowBlock / 32];
  const bool do_shrink = t > acc(0);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const scalar_t* grow = g_readout + b * N;
    const scalar_t* gwrow = g_weights + b * N;
    const acc* prow = probs + b * N;
    scalar_t* hrow = h + b * N;
    const acc norm = w_norm[b];
    const acc inv = inv_clamped_norm(norm);
    const bool passes = norm_passes_grad(norm);

    // 1. dot1 = sum_n dL/dw''_n w''_n, with w'' recomputed from the saved softmax.
    acc dot1 = 0;
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc pr = prow[n];
      const acc w2 = (do_shrink ? shrink(pr, t) : pr) * inv;
      dot1 += (to_acc(grow[n]) + to_acc(gwrow[n])) * w2;
    }
    dot1 = block_allreduce(dot1, SumOp{}, smem);

    // 2. dot2 = sum_n dL/dw_n w_n (through the renormalisation and the shrinkage).
    acc dot2 = 0;
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc pr = prow[n];
      dot2 += grad_probs(to_acc(grow[n]) + to_acc(gwrow[n]), pr, dot1, inv, t, do_shrink, p, passes) * pr;
    }
    dot2 = block_allreduce(dot2, SumOp{}, smem);

    // 3. Softmax backward and the temperature: h = w (dL/dw - dot2) / temperature. Each thread
    // rewrites only the entries it read, so h may alias g_readout.
    for (int64_t n = threadIdx.x; n < N; n += kRowBlock) {
      const acc pr = prow[n];
      const acc gp = grad_probs(to_acc(grow[n]) + to_acc(gwrow[n]), pr, dot1, inv, t, do_shrink, p, passes);
      hrow[n] = Store<scalar_t>::from(pr * (gp - dot2) / temperature);
    }
  }
}

// ---- project_rows: one warp per row ----
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    project_rows_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ xn,
                        const acc_t<scalar_t>* __restrict__ norms, int64_t rows, int64_t cols) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += warps) {
    scalar_t* gr = g + r * cols;
    const scalar_t* xr = xn + r * cols;
    const acc norm = norms[r];
    const acc inv = inv_clamped_norm(norm);
    // 1. <g_r, xn_r> (0 where the clamp holds: no gradient through the norm).
    acc dot = 0;
    if (norm_passes_grad(norm)) {
      for (int64_t c = lane; c < cols; c += 32) {
        dot += to_acc(gr[c]) * to_acc(xr[c]);
      }
      dot = warp_allreduce(dot, SumOp{});
    }
    // 2. Remove the radial part and undo the scaling.
    for (int64_t c = lane; c < cols; c += 32) {
      gr[c] = Store<scalar_t>::from((to_acc(gr[c]) - dot * to_acc(xr[c])) * inv);
    }
  }
}

int row_grid(int64_t rows) {
  return static_cast<int>(rows < kMaxGrid ? rows : kMaxGrid);
}

int warp_grid(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

}  // namespace

template <typename scalar_t>
cudaError_t normalize_rows(const scalar_t* x, scalar_t* xn, acc_t<scalar_t>* norms, bool compute_norms, int64_t rows,
                           int64_t cols, cudaStream_t stream) {
  if (rows <= 0) {
    return cudaSuccess;
  }
  normalize_rows_kernel<scalar_t>
      <<<warp_grid(rows), kWarpsPerBlock * 32, 0, stream>>>(x, xn, norms, compute_norms, rows, cols);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t forward_rows(const scalar_t* cosines, scalar_t* weights, acc_t<scalar_t>* probs, acc_t<scalar_t>* w_norm,
                         int64_t B, int64_t N, double shrink_threshold, double temperature, int p,
                         cudaStream_t stream) {
  if (B <= 0 || N <= 0) {
    return cudaSuccess;
  }
  using acc = acc_t<scalar_t>;
  forward_rows_kernel<scalar_t><<<row_grid(B), kRowBlock, 0, stream>>>(
      cosines, weights, probs, w_norm, B, N, static_cast<acc>(shrink_threshold), static_cast<acc>(temperature), p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_rows(const scalar_t* g_readout, const scalar_t* g_weights, const acc_t<scalar_t>* probs,
                          const acc_t<scalar_t>* w_norm, scalar_t* h, int64_t B, int64_t N, double shrink_threshold,
                          double temperature, int p, cudaStream_t stream) {
  if (B <= 0 || N <= 0) {
    return cudaSuccess;
  }
  using acc = acc_t<scalar_t>;
  backward_rows_kernel<scalar_t><<<row_grid(B), kRowBlock, 0, stream>>>(
      g_readout, g_weights, probs, w_norm, h, B, N, static_cast<acc>(shrink_threshold), static_cast<acc>(temperature),
      p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t project_rows(scalar_t* g, const scalar_t* xn, const acc_t<scalar_t>* norms, int64_t rows, int64_t cols,
                         cudaStream_t stream) {
  if (rows <= 0) {
    return cudaSuccess;
  }
  project_rows_kernel<scalar_t><<<warp_grid(rows), kWarpsPerBlock * 32, 0, stream>>>(g, xn, norms, rows, cols);
  return cudaGetLastError();
}

#define DF_MEMORY_ADDRESS_INSTANTIATE(T)                                                                             \
  template cudaError_t normalize_rows<T>(const T*, T*, acc_t<T>*, bool, int64_t, int64_t, cudaStream_t);             \
  template cudaError_t forward_rows<T>(const T*, T*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, double, double, int,    \
                                       cudaStream_t);                                                                \
  template cudaError_t backward_rows<T>(const T*, const T*, const acc_t<T>*, const acc_t<T>*, T*, int64_t, int64_t,  \
                                        double, double, int, cudaStream_t);                                          \
  template cudaError_t project_rows<T>(T*, const T*, const acc_t<T>*, int64_t, int64_t, cudaStream_t);

DF_MEMORY_ADDRESS_INSTANTIATE(float)
DF_MEMORY_ADDRESS_INSTANTIATE(double)
DF_MEMORY_ADDRESS_INSTANTIATE(__half)
DF_MEMORY_ADDRESS_INSTANTIATE(__nv_bfloat16)

#undef DF_MEMORY_ADDRESS_INSTANTIATE

}  // namespace cuda
}  // namespace memory_address
}  // namespace defect_fast
