// Host-side argument checks of defect_fast::msfr, shared by the CPU and CUDA implementations
// (defined in msfr.cpp; device-specific checks stay with each device).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace defect_fast {
namespace msfr {

// Checks S >= 1 scale pairs of one B, dtype and device, out_size (H, W) >= 1 and S finite
// non-negative weights (not all zero); returns the weights normalised to sum to 1.
std::vector<double> check_inputs(
    at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size, at::ArrayRef<double> weights);

}  // namespace msfr
}  // namespace defect_fast
