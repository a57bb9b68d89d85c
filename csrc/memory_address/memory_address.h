// Host-side argument checks of defect_fast::memory_address, shared by the CPU and CUDA
// implementations (defined in memory_address.cpp; device-specific checks stay with each device).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace defect_fast {
namespace memory_address {

// z [B, C], memory [N, C]: one dtype and device, 0 <= shrink_threshold, temperature > 0, p in {1, 2}.
void check_forward_args(const at::Tensor& z, const at::Tensor& memory, double shrink_threshold, double temperature,
                        int64_t p);
// The forward arguments plus the saved tensors and incoming gradients of memory_address_backward.
void check_backward_args(const at::Tensor& grad_z_hat, const at::Tensor& grad_weights, const at::Tensor& z,
                         const at::Tensor& memory, const at::Tensor& weights, const at::Tensor& probs,
                         const at::Tensor& z_norm, const at::Tensor& m_norm, const at::Tensor& w_norm,
                         const at::Tensor& z_unit, const at::Tensor& m_unit, double shrink_threshold,
                         double temperature, int64_t p);

}  // namespace memory_address
}  // namespace defect_fast
