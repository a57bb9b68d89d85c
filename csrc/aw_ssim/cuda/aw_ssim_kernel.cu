// CUDA kernels of the fused AW-SSIM (definition: defect_fast/ops/reference.py::aw_ssim; per-pixel
// math: aw_ssim_math.h). Only CUDA headers: compiles with `nvcc -c` without torch.
//
// Forward: one 16x16 block per output tile and image plane. The block stages the input tile plus
// its (K-1)-wide halo in shared memory, filters it horizontally then vertically over the five
// statistics (mu_x, mu_y, E[x^2], E[y^2], E[xy]), evaluates the index and its five partial
// derivatives per pixel, and writes one partial sum of the index per tile; a second kernel sums
// the tiles of each sample in a fixed order (deterministic, no atomics).
//
// Backward: one 16x16 block per input tile and plane (only the statistics that the requested
// gradients need are staged and filtered). The block stages the upstream-weighted
// partials of every output pixel whose window covers the tile (tile plus (K-1) halo up and left),
// applies the adjoint of valid filtering (full correlation with the flipped window) horizontally
// then vertically, and combines with x and y by the product rule of the second moments. Every
// gradient element is written by exactly one thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "aw_ssim/aw_ssim_math.h"
#include "aw_ssim/cuda/aw_ssim_kernel.h"

namespace defect_fast {
namespace aw_ssim {
namespace cuda {
namespace {

constexpr int kTile = 16;                   // output (forward) / input (backward) tile edge
constexpr int kThreads = kTile * kTile;     // one thread per tile pixel
constexpr int kDefaultSmem = 48 * 1024;     // dynamic shared memory usable without opt-in
// the score reductions halve the active threads from kThreads / 2 down to 1
static_assert((kThreads & (kThreads - 1)) == 0 && kThreads <= 1024, "kThreads: a power of two, at most 1024");

// Element conversions to and from the accumulation type.
template <typename T, typename acc_t>
struct Cvt {
  static __device__ __forceinline__ acc_t load(T v) { return static_cast<acc_t>(v); }
  static __device__ __forceinline__ T store(acc_t v) { return static_cast<T>(v); }
};
template <>
struct Cvt<__half, float> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half(v); }
};
template <>
struct Cvt<__nv_bfloat16, float> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16(v); }
};

__host__ __device__ __forceinline__ int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Shared-memory layout shared by host (sizes) and device (carving).
struct SmemLayout {
  int64_t taps, g, a, h, red, total;  // byte offsets (taps: double[K], the rest acc_t)
};

template <typename acc_t>
__host__ __device__ SmemLayout forward_layout(int K) {
  const int64_t span = kTile + K - 1;
  SmemLayout l;
  l.taps = 0;
  l.g = align16(static_cast<int64_t>(K) * sizeof(double));
  l.a = l.g + align16(K * sizeof(acc_t));                        // x and y tiles: 2 x [span][span]
  l.h = l.a + align16(2 * span * span * sizeof(acc_t));          // horizontal sums: [5][span][kTile]
  l.red = l.h + align16(kStats * span * kTile * sizeof(acc_t));  // reduction: [kThreads]
  l.total = l.red + align16(kThreads * sizeof(acc_t));
  return l;
}

template <typename acc_t>
__host__ __device__ SmemLayout backward_layout(int K) {
  const int64_t span = kTile + K - 1;
  SmemLayout l;
  l.taps = 0;
  l.g = align16(static_cast<int64_t>(K) * sizeof(double));
  l.a = l.g + align16(K * sizeof(acc_t));                        // weighted partials: [5][span][span]
  l.h = l.a + align16(kStats * span * span * sizeof(acc_t));     // horizontal adjoints: [5][span][kTile]
  l.red = l.h + align16(kStats * span * kTile * sizeof(acc_t));
  l.total = l.red;
  return l;
}

// The normalised window of sample b into g[0..K) (taps in double, normalised by their sum taken
// in index order, as the reference does; exactly symmetric, as on the CPU). Ends with a barrier.
template <typename acc_t>
__device__ __forceinline__ void load_window(double* taps, acc_t* g, double sigma, int K, int tid) {
  for (int k = tid; k < K; k += kThreads) taps[k] = gaussian_tap(k, K, sigma);  // (-o)^2 == o^2: symmetric
  __syncthreads();
  for (int k = tid; k < K; k += kThreads) {
    double total = 0.0;
    for (int i = 0; i < K; ++i) total += taps[i];
    g[k] = static_cast<acc_t>(taps[k] / total);
  }
  __syncthreads();
}

template <typename T, typename acc_t, int MODE, bool SAVE>
__global__ void __launch_bounds__(kThreads)
    aw_ssim_forward_kernel(const T* __restrict__ x, const T* __restrict__ y, const double* __restrict__ sigma,
                           int64_t planes, int64_t C, int H, int W, int K, Params<acc_t> p, T* __restrict__ map,
                           acc_t* __restrict__ partials, acc_t* __restrict__ tile_sums) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SmemLayout lay = forward_layout<acc_t>(K);
  double* taps = reinterpret_cast<double*>(smem + lay.taps);
  acc_t* g = reinterpret_cast<acc_t*>(smem + lay.g);
  const int span = kTile + K - 1;
  acc_t* sx = reinterpret_cast<acc_t*>(smem + lay.a);
  acc_t* sy = sx + span * span;
  acc_t* hs = reinterpret_cast<acc_t*>(smem + lay.h);  // [5][span][kTile]
  acc_t* red = reinterpret_cast<acc_t*>(smem + lay.red);

  const int HO = H - K + 1, WO = W - K + 1;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int x0 = blockIdx.x * kTile, y0 = blockIdx.y * kTile;  // tile origin (output = input coords)
  const int ox = x0 + tx, oy = y0 + ty;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t hw = static_cast<int64_t>(H) * W, ohw = static_cast<int64_t>(HO) * WO;

  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    // 1. window of this sample
    load_window(taps, g, sigma[plane / C], K, tid);

    // 2. input tile + halo -> shared memory (zero beyond the image; those values only reach
    //    outputs outside the valid region, which are not written)
    const T* xp = x + plane * hw;
    const T* yp = y + plane * hw;
    for (int i = tid; i < span * span; i += kThreads) {
      const int r = i / span, c = i - r * span;
      const int gy = y0 + r, gx = x0 + c;
      const bool inside = gy < H && gx < W;
      const int64_t off = static_cast<int64_t>(gy) * W + gx;
      sx[i] = inside ? Cvt<T, acc_t>::load(xp[off]) : acc_t(0);
      sy[i] = inside ? Cvt<T, acc_t>::load(yp[off]) : acc_t(0);
    }
    __syncthreads();

    // 3. horizontal pass over all span rows: 5 sums for column tx, of the products rounded
    //    first (x^2, y^2, xy), in the CPU kernel's order (sym_filter_n)
    for (int r = ty; r < span; r += kTile) {
      const acc_t* rx = sx + r * span + tx;
      const acc_t* ry = sy + r * span + tx;
      acc_t sums[kStats];
      sym_filter_n<kStats>(g, K, [&](int k, acc_t* t) {
        const acc_t a = rx[k], b = ry[k];
        t[0] = a;
        t[1] = b;
        t[2] = mul_rn(a, a);
        t[3] = mul_rn(b, b);
        t[4] = mul_rn(a, b);
      }, sums);
      acc_t* h = hs + r * kTile + tx;
#pragma unroll
      for (int s = 0; s < kStats; ++s) h[s * span * kTile] = sums[s];
    }
    __syncthreads();

    // 4. vertical pass, index and partials of output pixel (oy, ox)
    acc_t value = 0;
    if (ox < WO && oy < HO) {
      acc_t m[kStats];
      const acc_t* h = hs + ty * kTile + tx;
#pragma unroll
      for (int s = 0; s < kStats; ++s) {
        const acc_t* hc = h + s * span * kTile;
        m[s] = sym_filter(g, K, [&](int k) { return hc[k * kTile]; });
      }
      acc_t d[kStats];
      value = aw_ssim_point<acc_t, MODE, SAVE>(p, m[0], m[1], m[2], m[3], m[4], d);
      const int64_t o = static_cast<int64_t>(oy) * WO + ox;
      if (map != nullptr) map[plane * ohw + o] = Cvt<T, acc_t>::store(value);
      if (SAVE) {
        acc_t* pp = partials + plane * kStats * ohw + o;
#pragma unroll
        for (int s = 0; s < kStats; ++s) pp[s * ohw] = d[s];
      }
    }

    // 5. fixed-order tree reduction of the tile's index values -> one partial sum per tile
    red[tid] = value;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (tid < stride) red[tid] += red[tid + stride];
      __syncthreads();
    }
    if (tid == 0) tile_sums[plane * tiles + tile] = red[0];
    // the barriers above also order this plane's shared-memory reads before the next plane's writes
  }
}

// score[b] = (sum over c and tiles of tile_sums) / count, in a fixed order.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    aw_ssim_score_kernel(const acc_t* __restrict__ tile_sums, int64_t B, int64_t per_sample, double inv_count,
                         T* __restrict__ score) {
  __shared__ acc_t red[kThreads];
  const int tid = threadIdx.x;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t s = 0;
    const acc_t* src = tile_sums + b * per_sample;
    for (int64_t i = tid; i < per_sample; i += kThreads) s += src[i];
    red[tid] = s;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (tid < stride) red[tid] += red[tid + stride];
      __syncthreads();
    }
    if (tid == 0) score[b] = Cvt<T, acc_t>::store(static_cast<acc_t>(static_cast<double>(red[0]) * inv_count));
    __syncthreads();
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    aw_ssim_backward_kernel(const T* __restrict__ grad_score, const T* __restrict__ grad_map, const T* __restrict__ x,
                            const T* __restrict__ y, const double* __restrict__ sigma,
                            const acc_t* __restrict__ partials, int64_t planes, int64_t C, int H, int W, int K,
                            double inv_count, T* __restrict__ grad_x, T* __restrict__ grad_y) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SmemLayout lay = backward_layout<acc_t>(K);
  double* taps = reinterpret_cast<double*>(smem + lay.taps);
  acc_t* g = reinterpret_cast<acc_t*>(smem + lay.g);
  const int span = kTile + K - 1;
  acc_t* as = reinterpret_cast<acc_t*>(smem + lay.a);  // [5][span][span]
  acc_t* hs = reinterpret_cast<acc_t*>(smem + lay.h);  // [5][span][kTile]

  const int HO = H - K + 1, WO = W - K + 1;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int x0 = blockIdx.x * kTile, y0 = blockIdx.y * kTile;  // input tile origin
  const int px0 = x0 - (K - 1), py0 = y0 - (K - 1);            // first output pixel reaching it
  const int qx = x0 + tx, qy = y0 + ty;
  const int64_t hw = static_cast<int64_t>(H) * W, ohw = static_cast<int64_t>(HO) * WO;
  const int sq = span * span;
  // the statistics the requested gradients need: mu_x, E[x^2] for x; mu_y, E[y^2] for y; E[xy]
  const bool need_x = grad_x != nullptr, need_y = grad_y != nullptr;
  const bool use[kStats] = {need_x, need_y, need_x, need_y, true};

  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t b = plane / C;
    // 1. window of this sample (barrier at the end also protects the shared arrays below)
    load_window(taps, g, sigma[b], K, tid);

    // 2. upstream-weighted partials A_s = (d score/d index + grad_map) * d index/d stat_s over the
    //    output pixels [py0, py0+span) x [px0, px0+span); zero outside the valid region
    const acc_t gs = static_cast<acc_t>(static_cast<double>(Cvt<T, acc_t>::load(grad_score[b])) * inv_count);
    const acc_t* pp = partials + plane * kStats * ohw;
    const T* gm = grad_map != nullptr ? grad_map + plane * ohw : nullptr;
    for (int i = tid; i < sq; i += kThreads) {
      const int r = i / span, c = i - r * span;
      const int py = py0 + r, px = px0 + c;
      const bool inside = py >= 0 && py < HO && px >= 0 && px < WO;
      const int64_t o = static_cast<int64_t>(py) * WO + px;
      acc_t w = 0;
      if (inside) w = gm != nullptr ? gs + Cvt<T, acc_t>::load(gm[o]) : gs;
#pragma unroll
      for (int s = 0; s < kStats; ++s) {
        if (use[s]) as[s * sq + i] = inside ? w * pp[s * ohw + o] : acc_t(0);
      }
    }
    __syncthreads();

    // 3. horizontal adjoint for input column qx over all span rows:
    //    h_s[r] = sum_b g[b] A_s[r][qx - b] = sum_t g[K-1-t] A_s[r][tx + t]
    for (int r = ty; r < span; r += kTile) {
      acc_t h[kStats] = {0, 0, 0, 0, 0};
      for (int t = 0; t < K; ++t) {
        const acc_t w = g[K - 1 - t];
        const acc_t* a = as + r * span + tx + t;
#pragma unroll
        for (int s = 0; s < kStats; ++s) {
          if (use[s]) h[s] += w * a[s * sq];
        }
      }
#pragma unroll
      for (int s = 0; s < kStats; ++s) {
        if (use[s]) hs[s * span * kTile + r * kTile + tx] = h[s];
      }
    }
    __syncthreads();

    // 4. vertical adjoint for input row qy, then the product rule of E[x^2], E[y^2], E[xy]
    if (qx < W && qy < H) {
      acc_t f[kStats] = {0, 0, 0, 0, 0};
      for (int t = 0; t < K; ++t) {
        const acc_t w = g[K - 1 - t];
        const acc_t* h = hs + (ty + t) * kTile + tx;
#pragma unroll
        for (int s = 0; s < kStats; ++s) {
          if (use[s]) f[s] += w * h[s * span * kTile];
        }
      }
      const int64_t o = plane * hw + static_cast<int64_t>(qy) * W + qx;
      const acc_t xv = Cvt<T, acc_t>::load(x[o]);
      const acc_t yv = Cvt<T, acc_t>::load(y[o]);
      if (need_x) grad_x[o] = Cvt<T, acc_t>::store(f[0] + acc_t(2) * xv * f[2] + yv * f[4]);
      if (need_y) grad_y[o] = Cvt<T, acc_t>::store(f[1] + acc_t(2) * yv * f[3] + xv * f[4]);
    }
    __syncthreads();  // before the next plane overwrites the shared arrays
  }
}

static_assert(kMaxRows == kMaxGridY * kTile, "kMaxRows (aw_ssim_kernel.h) assumes 16-row tiles");

// Grid over tiles and planes (gridDim.z is capped; the kernels loop over the remaining planes).
// The glue keeps rows <= kMaxRows, so grid.y <= 65535 (the launchers also refuse taller ones).
dim3 tile_grid(int64_t rows, int64_t cols, int64_t planes) {
  const int64_t gz = planes < 65535 ? planes : 65535;
  return dim3(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile),
              static_cast<unsigned>(gz));
}

// Allows `bytes` of dynamic shared memory for `kernel`, or says why not.
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  // NB: the window is too large for this GPU's shared memory (the glue reports it).
  if (bytes > optin) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, typename acc_t, int MODE, bool SAVE>
cudaError_t forward_mode(const T* x, const T* y, const double* sigma, const Problem& pb, T* score, T* map,
                         acc_t* partials, acc_t* workspace, cudaStream_t stream) {
  const int K = pb.window;
  const int64_t HO = pb.H - K + 1, WO = pb.W - K + 1, planes = pb.B * pb.C;
  const Params<acc_t> p = make_params<acc_t>(pb.alpha, pb.beta, pb.gamma, pb.data_range);
  const int64_t bytes = forward_layout<acc_t>(K).total;
  auto kernel = aw_ssim_forward_kernel<T, acc_t, MODE, SAVE>;
  if (HO > kMaxRows) return cudaErrorInvalidValue;  // grid.y limit; the glue says so first
  cudaError_t err = prepare_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid = tile_grid(HO, WO, planes);
  kernel<<<grid, dim3(kTile, kTile), bytes, stream>>>(x, y, sigma, planes, pb.C, static_cast<int>(pb.H),
                                                      static_cast<int>(pb.W), K, p, map, partials, workspace);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t per_sample = pb.C * static_cast<int64_t>(grid.x) * grid.y;
  const double inv_count = 1.0 / static_cast<double>(pb.C * HO * WO);
  const unsigned blocks = static_cast<unsigned>(pb.B < 65535 ? pb.B : 65535);
  aw_ssim_score_kernel<T, acc_t><<<blocks, kThreads, 0, stream>>>(workspace, pb.B, per_sample, inv_count, score);
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t forward_typed(const void* x, const void* y, const double* sigma, const Problem& pb, void* score, void* map,
                          void* partials, void* workspace, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* yt = static_cast<const T*>(y);
  T* st = static_cast<T*>(score);
  T* mt = static_cast<T*>(map);
  acc_t* pt = static_cast<acc_t*>(partials);
  acc_t* wt = static_cast<acc_t*>(workspace);
  const int mode = select_mode(pb.combine, pb.alpha, pb.beta, pb.gamma);
  const bool save = partials != nullptr;
#define AW_SSIM_FORWARD_CASE(M)                                                              \
  case M:                                                                                    \
    return save ? forward_mode<T, acc_t, M, true>(xt, yt, sigma, pb, st, mt, pt, wt, stream) \
                : forward_mode<T, acc_t, M, false>(xt, yt, sigma, pb, st, mt, pt, wt, stream);
  switch (mode) {
    AW_SSIM_FORWARD_CASE(kModeSum)
    AW_SSIM_FORWARD_CASE(kModeProductOnes)
    AW_SSIM_FORWARD_CASE(kModeProduct)
    default:
      return cudaErrorInvalidValue;
  }
#undef AW_SSIM_FORWARD_CASE
}

template <typename T, typename acc_t>
cudaError_t backward_typed(const void* grad_score, const void* grad_map, const void* x, const void* y,
                           const double* sigma, const void* partials, const Problem& pb, void* grad_x, void* grad_y,
                           cudaStream_t stream) {
  const int K = pb.window;
  const int64_t HO = pb.H - K + 1, WO = pb.W - K + 1, planes = pb.B * pb.C;
  const int64_t bytes = backward_layout<acc_t>(K).total;
  auto kernel = aw_ssim_backward_kernel<T, acc_t>;
  if (pb.H > kMaxRows) return cudaErrorInvalidValue;  // grid.y limit; the glue says so first
  cudaError_t err = prepare_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  const double inv_count = 1.0 / static_cast<double>(pb.C * HO * WO);
  kernel<<<tile_grid(pb.H, pb.W, planes), dim3(kTile, kTile), bytes, stream>>>(
      static_cast<const T*>(grad_score), static_cast<const T*>(grad_map), static_cast<const T*>(x),
      static_cast<const T*>(y), sigma, static_cast<const acc_t*>(partials), planes, pb.C, static_cast<int>(pb.H),
      static_cast<int>(pb.W), K, inv_count, static_cast<T*>(grad_x), static_cast<T*>(grad_y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_backward(DType dtype, const Problem& pb) {
  switch (dtype) {
    case DType::kFloat:
      return prepare_smem(aw_ssim_backward_kernel<float, float>, backward_layout<float>(pb.window).total);
    case DType::kDouble:
      return prepare_smem(aw_ssim_backward_kernel<double, double>, backward_layout<double>(pb.window).total);
    case DType::kHalf:
      return prepare_smem(aw_ssim_backward_kernel<__half, float>, backward_layout<float>(pb.window).total);
    case DType::kBFloat16:
      return prepare_smem(aw_ssim_backward_kernel<__nv_bfloat16, float>, backward_layout<float>(pb.window).total);
  }
  return cudaErrorInvalidValue;
}

int64_t forward_workspace_elems(const Problem& pb) {
  const int64_t HO = pb.H - pb.window + 1, WO = pb.W - pb.window + 1;
  return pb.B * pb.C * ((HO + kTile - 1) / kTile) * ((WO + kTile - 1) / kTile);
}

cudaError_t launch_forward(DType dtype, const void* x, const void* y, const double* sigma, const Problem& pb, void* score,
                           void* map, void* partials, void* workspace, cudaStream_t stream) {
  if (pb.B * pb.C == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat:
      return forward_typed<float, float>(x, y, sigma, pb, score, map, partials, workspace, stream);
    case DType::kDouble:
      return forward_typed<double, double>(x, y, sigma, pb, score, map, partials, workspace, stream);
    case DType::kHalf:
      return forward_typed<__half, float>(x, y, sigma, pb, score, map, partials, workspace, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16, float>(x, y, sigma, pb, score, map, partials, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, const void* grad_score, const void* grad_map, const void* x, const void* y,
                            const double* sigma, const void* partials, const Problem& pb, void* grad_x, void* grad_y,
                            cudaStream_t stream) {
  if (pb.B * pb.C == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat:
      return backward_typed<float, float>(grad_score, grad_map, x, y, sigma, partials, pb, grad_x, grad_y, stream);
    case DType::kDouble:
      return backward_typed<double, double>(grad_score, grad_map, x, y, sigma, partials, pb, grad_x, grad_y, stream);
    case DType::kHalf:
      return backward_typed<__half, float>(grad_score, grad_map, x, y, sigma, partials, pb, grad_x, grad_y, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16, float>(grad_score, grad_map, x, y, sigma, partials, pb, grad_x, grad_y,
                                                  stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace aw_ssim
}  // namespace defect_fast
