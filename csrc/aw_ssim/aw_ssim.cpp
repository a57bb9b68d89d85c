// Schemas of the fused AW-SSIM ops (implementations: cpu/aw_ssim_cpu.cpp, cuda/aw_ssim_cuda.cpp;
// fake kernels and autograd: defect_fast/ops/_aw_ssim.py; definition: defect_fast/ops/reference.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "aw_ssim/aw_ssim.h"
#include "aw_ssim/aw_ssim_math.h"

namespace defect_fast {
namespace aw_ssim {

void check_common(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& sigma, int64_t window,
                  int64_t combine) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": x and y must have one shape, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": x and y must have one dtype, got ", x.scalar_type(), " and ",
              y.scalar_type());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(window >= 1 && window % 2 == 1, op, ": window must be a positive odd number, got ", window);
  TORCH_CHECK(x.size(2) >= window && x.size(3) >= window, op, ": window ", window, " does not fit in images of size ",
              x.size(2), "x", x.size(3));
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0), op, ": sigma must be [B] with B=", x.size(0), ", got ",
              sigma.sizes());
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), op, ": sigma must be floating point, got ", sigma.scalar_type());
  TORCH_CHECK(combine == kSum || combine == kProduct, op, ": combine must be 0 (sum) or 1 (product), got ", combine);
}

}  // namespace aw_ssim
}  // namespace defect_fast

TORCH_LIBRARY_FRAGMENT(defect_fast, m) {
  // The fake (meta) kernels and the autograd formula are registered by this Python module.
  m.set_python_module("defect_fast.ops._aw_ssim");
  // Adaptive weighted SSIM with a per-sample Gaussian window, valid windows only.
  //
  // Args:
  //   x, y:    [B, C, H, W] images, same shape, dtype and device; H, W >= window.
  //            float32 / float64 (CPU and CUDA), float16 / bfloat16 (CUDA; on the CPU they are
  //            computed in float32).
  //   sigma:   [B] Gaussian standard deviation per sample (> 0), any floating dtype, same device.
  //   alpha, beta, gamma: weights ("sum") or exponents ("product") of luminance, contrast, structure.
  //   window:  odd window length K.
  //   combine: 0 = "sum" (alpha l + beta c + gamma s), 1 = "product" (sign(.)|.|^e of each term).
  //   data_range: L, the dynamic range of the pixel values.
  //   return_map:    fill `map` (else it is an empty tensor).
  //   save_partials: fill `partials` for the backward (else it is an empty tensor and the backward
  //            recomputes them).
  // Returns:
  //   score    [B], dtype of x: mean of the index over C, H-K+1, W-K+1.
  //   map      [B, C, H-K+1, W-K+1], dtype of x (or [0]).
  //   partials [B, C, 5, H-K+1, W-K+1]: d index / d(mu_x, mu_y, E[x^2], E[y^2], E[xy]) per pixel,
  //            dtype of x for float32/float64, float32 for float16/bfloat16 (or [0]).
  m.def(
      "aw_ssim(Tensor x, Tensor y, Tensor sigma, float alpha, float beta, float gamma, int window, int combine, "
      "float data_range, bool return_map, bool save_partials) -> (Tensor score, Tensor map, Tensor partials)");
  // Gradient of aw_ssim with respect to x and y.
  //
  // Args:
  //   grad_score: [B] upstream gradient of the score.
  //   grad_map:   [B, C, H-K+1, W-K+1] upstream gradient of the map, or an empty tensor for none.
  //   x, y, sigma and the scalars: as given to aw_ssim.
  //   partials:   as returned by aw_ssim with save_partials=True, or an empty tensor: they are then
  //               recomputed (the CPU kernel does so plane by plane, in cache, which is faster
  //               there than saving them; the CUDA kernel recomputes them all first).
  //   output_mask: which of (grad_x, grad_y) to compute; the gradient of y is usually not needed
  //               (a target image), and without it two of the five statistics are not filtered.
  // Returns:
  //   grad_x, grad_y: [B, C, H, W], dtype of x (or [0] where output_mask is false).
  m.def(
      "aw_ssim_backward(Tensor grad_score, Tensor grad_map, Tensor x, Tensor y, Tensor sigma, Tensor partials, "
      "float alpha, float beta, float gamma, int window, int combine, float data_range, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_y)");
}
