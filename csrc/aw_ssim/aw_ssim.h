// Host-side argument checks of defect_fast::aw_ssim shared by the CPU and CUDA implementations
// (defined in aw_ssim.cpp; each device adds its own: placement, sigma > 0 on the CPU, 32-bit
// sides on CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace defect_fast {
namespace aw_ssim {

// x, y [B, C, H, W] of one shape and a supported dtype; odd window that fits in H and W;
// sigma [B] floating point; combine kSum or kProduct. ``op`` prefixes the messages.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sigma, int64_t window,
                  int64_t combine);

}  // namespace aw_ssim
}  // namespace defect_fast
