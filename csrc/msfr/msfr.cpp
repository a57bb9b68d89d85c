// Schema and host-side input checks of defect_fast::msfr, the multi-scale feature residual map
// of CMA-AE (Eq. 15). The kernels: cpu/msfr_cpu.cpp and cuda/msfr_{kernel.cu,cuda.cpp}; the
// definition they compute: defect_fast/ops/reference.py::msfr; the Python front with the fake
// (meta) kernel: defect_fast/ops/_msfr.py.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "msfr/msfr.h"

namespace defect_fast {
namespace msfr {

// Checks the arguments of defect_fast::msfr shared by the CPU and CUDA implementations and
// returns the normalised weights w_i / sum_j w_j (computed in double, summed in order).
//
// Args:
//   feats_x, feats_r: S >= 1 tensors each; feats_x[i] and feats_r[i] of one shape [B, C_i, H_i, W_i]
//     with C_i, H_i, W_i >= 1 and one B for all scales; one dtype and one device for all.
//   out_size: (H, W), both >= 1.
//   weights: S finite non-negative values, not all zero.
std::vector<double> check_inputs(
    at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size, at::ArrayRef<double> weights) {
  const int64_t num_scales = static_cast<int64_t>(feats_x.size());
  TORCH_CHECK(num_scales >= 1, "defect_fast::msfr: needs at least one scale, got none");
  TORCH_CHECK(static_cast<int64_t>(feats_r.size()) == num_scales,
              "defect_fast::msfr: feats_x has ", num_scales, " scales but feats_r has ", feats_r.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_scales,
              "defect_fast::msfr: ", weights.size(), " weights for ", num_scales, " scales");
  TORCH_CHECK(out_size.size() == 2, "defect_fast::msfr: out_size must be (H, W), got ", out_size);
  TORCH_CHECK(out_size[0] >= 1 && out_size[1] >= 1, "defect_fast::msfr: out_size must be positive, got ", out_size);

  const at::Tensor& first = feats_x[0];
  for (int64_t i = 0; i < num_scales; ++i) {
    const at::Tensor& x = feats_x[i];
    const at::Tensor& r = feats_r[i];
    TORCH_CHECK(x.dim() == 4, "defect_fast::msfr: feats_x[", i, "] must be [B, C, H, W], got shape ", x.sizes());
    TORCH_CHECK(x.sizes() == r.sizes(), "defect_fast::msfr: scale ", i, " shapes differ: feats_x ", x.sizes(),
                " vs feats_r ", r.sizes());
    TORCH_CHECK(x.size(0) == first.size(0), "defect_fast::msfr: scale ", i, " has batch ", x.size(0),
                " but scale 0 has ", first.size(0));
    TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1,
                "defect_fast::msfr: scale ", i, " needs C, H, W >= 1, got shape ", x.sizes());
    TORCH_CHECK(x.scalar_type() == first.scalar_type() && r.scalar_type() == first.scalar_type(),
                "defect_fast::msfr: all features must share one dtype; scale 0 is ", first.scalar_type(),
                ", scale ", i, " is ", x.scalar_type(), " / ", r.scalar_type());
    TORCH_CHECK(x.device() == first.device() && r.device() == first.device(),
                "defect_fast::msfr: all features must be on one device; scale 0 is on ", first.device(),
                ", scale ", i, " on ", x.device(), " / ", r.device());
  }

  double total = 0.0;
  for (int64_t i = 0; i < num_scales; ++i) {
    TORCH_CHECK(std::isfinite(weights[i]) && weights[i] >= 0.0,
                "defect_fast::msfr: weights must be finite and non-negative, got ", weights);
    total += weights[i];
  }
  TORCH_CHECK(total > 0.0, "defect_fast::msfr: weights must be non-negative and not all zero, got ", weights);
  std::vector<double> normalised(weights.begin(), weights.end());
  for (double& w : normalised) {
    w /= total;
  }
  return normalised;
}

}  // namespace msfr
}  // namespace defect_fast

TORCH_LIBRARY_FRAGMENT(defect_fast, m) {
  m.set_python_module("defect_fast.ops._msfr");
  // msfr(feats_x, feats_r, out_size, weights) -> [B, 1, H, W]
  //   feats_x, feats_r: S lists of [B, C_i, H_i, W_i] (same shapes pairwise, one B, dtype, device)
  //   out_size: (H, W); weights: S non-negative floats, not all zero (normalised by their sum)
  //   out[b, 0] = sum_i w_i / sum_j w_j * bilinear_{(H_i, W_i) -> (H, W)}(mean_c (x_i - r_i)^2)[b]
  // Bilinear as F.interpolate(mode="bilinear", align_corners=False). Inference only.
  m.def("msfr(Tensor[] feats_x, Tensor[] feats_r, int[] out_size, float[] weights) -> Tensor");
  // msfr_float: the same map computed and returned in float32 (float64 for float64 features) from
  // features of any floating dtype, read in place (CPU only): msfr of the upcast features without
  // the copies, what the front runs under CPU autocast.
  m.def("msfr_float(Tensor[] feats_x, Tensor[] feats_r, int[] out_size, float[] weights) -> Tensor");
}
