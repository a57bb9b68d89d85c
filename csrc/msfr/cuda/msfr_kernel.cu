// CUDA kernels of defect_fast::msfr (multi-scale feature residual, Eq. 15 of CMA-AE).
// Only CUDA headers: `nvcc -c -arch=sm_90 msfr_kernel.cu` works without torch.
//
// Two kernels, each launched once per group of up to kMaxScales scales:
//   1. residual_kernel: R_i[b, j] = mean_c (x_i[b, c, j] - r_i[b, c, j])^2 at the low resolution
//      of scale i (j = y * W_i + x), written to the workspace. A block is a 32 x 8 tile: 32
//      neighbouring pixels (one coalesced warp-wide load per channel) by 8 channel slices, the
//      slices summed in shared memory in a fixed order (deterministic).
//   2. combine_kernel: one thread per output pixel reads the four bilinear taps of every R_i
//      (small, cache-resident) and writes sum_i w_i * bilinear_i(R_i).
// Accumulation: float for float, half and bfloat16; double for double. 64-bit indices.
#include "msfr/cuda/msfr_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "msfr/msfr_math.h"

namespace defect_fast {
namespace msfr {
namespace {

constexpr int kMaxScales = 8;       // scales per launch (kernel parameters are passed by value)
constexpr int kTileX = 32;          // pixels per residual block (one warp)
constexpr int kTileC = 8;           // channel slices per residual block
constexpr int kCombineThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
static_assert(kTileX * kTileC <= 1024 && kCombineThreads <= 1024, "at most 1024 threads per block");

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename scalar_t, typename acc_t>
struct ResidualParams {
  struct Scale {
    const scalar_t* x;  // [batch, C, HW]
    const scalar_t* r;  // [batch, C, HW]
    acc_t* residual;    // [batch, HW]
    int64_t channels;
    int64_t plane;        // HW
    int64_t tiles;        // ceil(HW / kTileX)
    int64_t block_begin;  // first block of this scale; scale i owns [block_begin_i, block_begin_{i+1})
  } s[kMaxScales];
  int num_scales;
  int64_t total_blocks;
};

template <typename scalar_t, typename acc_t>
struct CombineParams {
  struct Scale {
    const acc_t* residual;  // [batch, height, width]
    int64_t height;
    int64_t width;
    acc_t scale_h;  // height / out_h, as ATen computes it
    acc_t scale_w;  // width / out_w
    acc_t weight;   // normalised weight
  } s[kMaxScales];
  int num_scales;
  int64_t batch, out_h, out_w;
  const acc_t* partial_in;  // [batch, out_h, out_w] sum of earlier scale groups, or nullptr
  acc_t* partial_out;       // where to store the running sum when more groups follow, or nullptr
  scalar_t* out;            // [batch, 1, out_h, out_w] when this is the last group, else nullptr
};

// Phase 1: channel-mean squared residual at low resolution.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileX * kTileC) residual_kernel(const ResidualParams<scalar_t, acc_t> p) {
  __shared__ acc_t partial[kTileC][kTileX];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  for (int64_t block = blockIdx.x; block < p.total_blocks; block += gridDim.x) {
    // 1a. which scale, batch item and tile this block handles (uniform across the block)
    int i = 0;
    while (i + 1 < p.num_scales && block >= p.s[i + 1].block_begin) {
      ++i;
    }
    const auto& sc = p.s[i];
    const int64_t local = block - sc.block_begin;
    const int64_t b = local / sc.tiles;
    const int64_t j = (local - b * sc.tiles) * kTileX + tx;

    // 1b. this thread's channel slice c = ty, ty + kTileC, ... summed in order
    acc_t acc = acc_t(0);
    if (j < sc.plane) {
      const int64_t base = b * sc.channels * sc.plane + j;
#pragma unroll 4
      for (int64_t c = ty; c < sc.channels; c += kTileC) {
        const int64_t idx = base + c * sc.plane;
        acc += squared_residual<acc_t>(to_acc<acc_t>(sc.x[idx]), to_acc<acc_t>(sc.r[idx]));
      }
    }
    partial[ty][tx] = acc;
    __syncthreads();

    // 1c. the slices summed in a fixed order, divided by C (the mean as torch: sum / count)
    if (ty == 0 && j < sc.plane) {
      acc_t sum = partial[0][tx];
#pragma unroll
      for (int k = 1; k < kTileC; ++k) {
        sum += partial[k][tx];
      }
      sc.residual[b * sc.plane + j] = sum / static_cast<acc_t>(sc.channels);
    }
    __syncthreads();
  }
}

// Phase 2: bilinear taps of every scale and the weighted sum, one thread per output pixel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const CombineParams<scalar_t, acc_t> p) {
  const int64_t plane = p.out_h * p.out_w;
  const int64_t total = p.batch * plane;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / plane;
    const int64_t rem = idx - b * plane;
    const int64_t Y = rem / p.out_w;
    const int64_t X = rem - Y * p.out_w;
    acc_t value = p.partial_in != nullptr ? p.partial_in[idx] : acc_t(0);
    for (int i = 0; i < p.num_scales; ++i) {
      const auto& sc = p.s[i];
      int64_t y0, y1, x0, x1;
      acc_t ly0, ly1, lx0, lx1;
      axis_taps<acc_t>(Y, sc.height, p.out_h, sc.scale_h, y0, y1, ly0, ly1);
      axis_taps<acc_t>(X, sc.width, p.out_w, sc.scale_w, x0, x1, lx0, lx1);
      const acc_t up = bilinear_sample<acc_t>(sc.residual + b * sc.height * sc.width, sc.width, y0, y1, ly0, ly1,
                                              x0, x1, lx0, lx1);
      // NB: the reference's order, out = out + up_i * w_i from out = 0 (nvcc may fuse the
      // multiply-add, a rounding-level difference).
      value = value + up * sc.weight;
    }
    if (p.out != nullptr) {
      p.out[idx] = from_acc<scalar_t, acc_t>(value);
    } else {
      p.partial_out[idx] = value;
    }
  }
}

size_t align_up(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

size_t residual_bytes(size_t acc_size, const CudaScale* scales, int64_t num_scales, int64_t batch) {
  size_t elems = 0;
  for (int64_t i = 0; i < num_scales; ++i) {
    elems += static_cast<size_t>(batch) * static_cast<size_t>(scales[i].height * scales[i].width);
  }
  return align_up(elems * acc_size);
}

template <typename scalar_t>
cudaError_t forward_typed(const CudaScale* scales, int64_t num_scales, int64_t batch, int64_t out_h, int64_t out_w,
                          void* workspace, void* out, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t* residual_all = static_cast<acc_t*>(workspace);
  acc_t* partial = reinterpret_cast<acc_t*>(static_cast<char*>(workspace) +
                                            residual_bytes(sizeof(acc_t), scales, num_scales, batch));
  const int64_t out_elems = batch * out_h * out_w;

  int64_t residual_offset = 0;
  for (int64_t first = 0; first < num_scales; first += kMaxScales) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxScales, num_scales - first));
    const bool last_group = first + count == num_scales;

    // Phase 1 for this group of scales: one launch.
    ResidualParams<scalar_t, acc_t> rp{};
    CombineParams<scalar_t, acc_t> cp{};
    int64_t blocks = 0;
    for (int k = 0; k < count; ++k) {
      const CudaScale& s = scales[first + k];
      const int64_t plane = s.height * s.width;
      rp.s[k].x = static_cast<const scalar_t*>(s.x);
      rp.s[k].r = static_cast<const scalar_t*>(s.r);
      rp.s[k].residual = residual_all + residual_offset;
      rp.s[k].channels = s.channels;
      rp.s[k].plane = plane;
      rp.s[k].tiles = (plane + kTileX - 1) / kTileX;
      rp.s[k].block_begin = blocks;
      blocks += batch * rp.s[k].tiles;

      cp.s[k].residual = residual_all + residual_offset;
      cp.s[k].height = s.height;
      cp.s[k].width = s.width;
      cp.s[k].scale_h = axis_scale<acc_t>(s.height, out_h);
      cp.s[k].scale_w = axis_scale<acc_t>(s.width, out_w);
      cp.s[k].weight = static_cast<acc_t>(s.weight);
      residual_offset += batch * plane;
    }
    rp.num_scales = count;
    rp.total_blocks = blocks;
    const dim3 residual_block(kTileX, kTileC);
    const unsigned residual_grid = static_cast<unsigned>(std::min(blocks, kMaxBlocks));
    residual_kernel<scalar_t, acc_t><<<residual_grid, residual_block, 0, stream>>>(rp);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }

    // Phase 2 for this group: adds to the running sum of the earlier groups.
    cp.num_scales = count;
    cp.batch = batch;
    cp.out_h = out_h;
    cp.out_w = out_w;
    cp.partial_in = first == 0 ? nullptr : partial;
    cp.partial_out = last_group ? nullptr : partial;
    cp.out = last_group ? static_cast<scalar_t*>(out) : nullptr;
    const int64_t combine_blocks = std::min((out_elems + kCombineThreads - 1) / kCombineThreads, kMaxBlocks);
    combine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(combine_blocks), kCombineThreads, 0, stream>>>(cp);
    err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

}  // namespace

size_t msfr_cuda_workspace_bytes(CudaDtype dtype, const CudaScale* scales, int64_t num_scales, int64_t batch,
                                 int64_t out_h, int64_t out_w) {
  const size_t acc_size = dtype == CudaDtype::kFloat64 ? sizeof(double) : sizeof(float);
  size_t bytes = residual_bytes(acc_size, scales, num_scales, batch);
  if (num_scales > kMaxScales) {
    bytes += align_up(static_cast<size_t>(batch * out_h * out_w) * acc_size);
  }
  return std::max<size_t>(bytes, 256);
}

cudaError_t msfr_cuda_forward(CudaDtype dtype, const CudaScale* scales, int64_t num_scales, int64_t batch,
                              int64_t out_h, int64_t out_w, void* workspace, void* out, cudaStream_t stream) {
  if (num_scales < 1 || batch < 1 || out_h < 1 || out_w < 1) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case CudaDtype::kFloat32:
      return forward_typed<float>(scales, num_scales, batch, out_h, out_w, workspace, out, stream);
    case CudaDtype::kFloat64:
      return forward_typed<double>(scales, num_scales, batch, out_h, out_w, workspace, out, stream);
    case CudaDtype::kFloat16:
      return forward_typed<__half>(scales, num_scales, batch, out_h, out_w, workspace, out, stream);
    case CudaDtype::kBFloat16:
      return forward_typed<__nv_bfloat16>(scales, num_scales, batch, out_h, out_w, workspace, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msfr
}  // namespace defect_fast
