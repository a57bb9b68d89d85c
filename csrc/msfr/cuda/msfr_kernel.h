// CUDA launchers of defect_fast::msfr. Raw pointers, sizes and a stream; no torch headers, so
// that this header and msfr_kernel.cu compile with nvcc alone (the torch glue: msfr_cuda.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace defect_fast {
namespace msfr {

// Element type of the features and of the output. Accumulation is in float for kFloat32,
// kFloat16 and kBFloat16 and in double for kFloat64.
enum class CudaDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One scale: device pointers to the features x and r, both contiguous [batch, channels, height,
// width] of the launch's dtype, and the scale's weight already divided by the sum of all weights.
struct CudaScale {
  const void* x;
  const void* r;
  int64_t channels;
  int64_t height;
  int64_t width;
  double weight;
};

// Bytes of device workspace msfr_cuda_forward needs for these scales (0 never: at least the
// per-scale low-resolution residuals, batch * sum_i height_i * width_i accumulators).
size_t msfr_cuda_workspace_bytes(CudaDtype dtype, const CudaScale* scales, int64_t num_scales, int64_t batch,
                                 int64_t out_h, int64_t out_w);

// out[b, 0, Y, X] = sum_i scales[i].weight * bilinear_i(mean_c (x_i - r_i)^2)[b](Y, X), with the
// bilinear resize of F.interpolate(mode="bilinear", align_corners=False).
//
// Args:
//   dtype: element type of every x, r and of out.
//   scales: host array of num_scales >= 1 scale descriptors (read before the call returns).
//   batch, out_h, out_w: B >= 1 and the output size H, W >= 1.
//   workspace: device buffer of msfr_cuda_workspace_bytes(...) bytes, 256-byte aligned.
//   out: device pointer to a contiguous [batch, 1, out_h, out_w] output.
//   stream: the stream every kernel is queued on.
// Returns the first launch error (cudaSuccess when all launches were queued).
cudaError_t msfr_cuda_forward(CudaDtype dtype, const CudaScale* scales, int64_t num_scales, int64_t batch,
                              int64_t out_h, int64_t out_w, void* workspace, void* out, cudaStream_t stream);

}  // namespace msfr
}  // namespace defect_fast
