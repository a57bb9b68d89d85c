// Torch glue of the CUDA kernels of defect_fast::msfr: checks, device guard, current stream,
// workspace, launch check. The kernels themselves: msfr_kernel.cu (no torch headers).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "msfr/msfr.h"
#include "msfr/cuda/msfr_kernel.h"

namespace defect_fast {
namespace msfr {

namespace {

CudaDtype cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return CudaDtype::kFloat32;
    case at::kDouble:
      return CudaDtype::kFloat64;
    case at::kHalf:
      return CudaDtype::kFloat16;
    case at::kBFloat16:
      return CudaDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "defect_fast::msfr (CUDA): float32, float64, float16 or bfloat16 features expected, got ",
                  type);
  }
}

// feats_x, feats_r: S lists of CUDA [B, C_i, H_i, W_i]; out_size (H, W); weights: S floats.
// Returns [B, 1, H, W] of the features' dtype on their device.
at::Tensor msfr_cuda(at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size,
                     at::ArrayRef<double> weights) {
  const std::vector<double> normalised = check_inputs(feats_x, feats_r, out_size, weights);
  const at::Tensor& first = feats_x[0];
  TORCH_CHECK(first.is_cuda(), "defect_fast::msfr (CUDA): features must be CUDA tensors, got ", first.device());
  const CudaDtype dtype = cuda_dtype(first.scalar_type());

  const c10::cuda::CUDAGuard device_guard(first.device());
  const int64_t batch = first.size(0);
  const int64_t out_h = out_size[0], out_w = out_size[1];
  at::Tensor out = at::empty({batch, 1, out_h, out_w}, first.options());
  if (batch == 0) {
    return out;
  }

  // Contiguous copies (no-ops for contiguous inputs) stay alive until the launches are queued;
  // the caching allocator orders their reuse after the kernels on this stream.
  const int64_t num_scales = static_cast<int64_t>(feats_x.size());
  std::vector<at::Tensor> keep;
  keep.reserve(2 * feats_x.size());
  std::vector<CudaScale> scales(feats_x.size());
  for (int64_t i = 0; i < num_scales; ++i) {
    keep.push_back(feats_x[i].contiguous());
    keep.push_back(feats_r[i].contiguous());
    const at::Tensor& x = keep[keep.size() - 2];
    const at::Tensor& r = keep.back();
    scales[i] = CudaScale{x.data_ptr(), r.data_ptr(), x.size(1), x.size(2), x.size(3), normalised[i]};
  }

  const size_t workspace_bytes =
      msfr_cuda_workspace_bytes(dtype, scales.data(), num_scales, batch, out_h, out_w);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, first.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = msfr_cuda_forward(dtype, scales.data(), num_scales, batch, out_h, out_w,
                                            workspace.data_ptr(), out.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "defect_fast::msfr (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace msfr
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CUDA, m) {
  m.impl("msfr", &defect_fast::msfr::msfr_cuda);
}
