// CUDA glue of defect_fast::aw_ssim and defect_fast::aw_ssim_backward: checks, allocation,
// device guard, current stream, launch checks. The kernels are in aw_ssim_kernel.cu.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "aw_ssim/aw_ssim.h"
#include "aw_ssim/aw_ssim_math.h"
#include "aw_ssim/cuda/aw_ssim_kernel.h"

namespace defect_fast {
namespace aw_ssim {
namespace {

using at::Tensor;

cuda::DType kernel_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat:
      return cuda::DType::kFloat;
    case at::kDouble:
      return cuda::DType::kDouble;
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "aw_ssim: x must be float32, float64, float16 or bfloat16, got ", dt);
  }
}

// float64 stays float64; float32, float16 and bfloat16 accumulate (and keep partials) in float32.
at::ScalarType acc_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const char* op, const Tensor& x, const Tensor& y, const Tensor& sigma, int64_t window, int64_t combine) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda() && sigma.is_cuda(), op, ": the CUDA kernel got tensors on ", x.device(), ", ",
              y.device(), ", ", sigma.device());
  TORCH_CHECK(y.device() == x.device() && sigma.device() == x.device(), op, ": x, y and sigma must be on one device, got ",
              x.device(), ", ", y.device(), ", ", sigma.device());
  check_common(op, x, y, sigma, window, combine);
  // (a column index runs a tile and a window past the last column: it must not wrap around)
  TORCH_CHECK(x.size(2) <= INT32_MAX && x.size(3) <= INT32_MAX - cuda::kIndexMargin - window, op,
              ": image sides must fit in 32 bits with a tile and the window to spare, got ", x.sizes());
  // The kernels tile the rows 16 at a time over grid.y, which CUDA caps at 65535.
  TORCH_CHECK(x.size(2) <= cuda::kMaxRows, op, ": the CUDA kernel takes images up to ", cuda::kMaxRows,
              " rows (16-row tiles x 65535 blocks in grid.y), got H=", x.size(2),
              "; split the image along its height or run it on the CPU");
  // NB: sigma is not checked here (it would synchronise with the device), unlike on the CPU,
  // which refuses a sigma that is not finite and > 0. On CUDA sigma = 0 gives a NaN window, a
  // negative sigma the window of |sigma| (only sigma^2 enters it), an infinite one a flat window.
}

cuda::Problem make_problem(const Tensor& x, int64_t window, int64_t combine, double alpha, double beta, double gamma,
                           double data_range) {
  cuda::Problem pb;
  pb.B = x.size(0);
  pb.C = x.size(1);
  pb.H = x.size(2);
  pb.W = x.size(3);
  pb.window = static_cast<int>(window);
  pb.combine = static_cast<int>(combine);
  pb.alpha = alpha;
  pb.beta = beta;
  pb.gamma = gamma;
  pb.data_range = data_range;
  return pb;
}

// The launchers' own shared-memory check returns cudaErrorInvalidConfiguration; the grid limits
// are checked before any launch (check_inputs), so a too-tall image never reaches this message.
void check_launch(const char* op, cudaError_t err, int64_t window) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, op, ": window ", window,
              " needs more shared memory per block than this GPU offers (", cudaGetErrorString(err), ")");
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> aw_ssim_cuda(const Tensor& x_in, const Tensor& y_in, const Tensor& sigma_in,
                                                double alpha, double beta, double gamma, int64_t window,
                                                int64_t combine, double data_range, bool return_map,
                                                bool save_partials) {
  check_inputs("aw_ssim", x_in, y_in, sigma_in, window, combine);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor y = y_in.contiguous();
  const Tensor sigma = sigma_in.to(at::kDouble).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HO = H - window + 1, WO = W - window + 1;
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  Tensor score = at::empty({B}, x.options());
  Tensor map = return_map ? at::empty({B, C, HO, WO}, x.options()) : at::empty({0}, x.options());
  Tensor part = save_partials ? at::empty({B, C, kStats, HO, WO}, acc) : at::empty({0}, acc);
  if (B == 0) return {score, map, part};
  if (C == 0) return {score.fill_(std::numeric_limits<double>::quiet_NaN()), map, part};  // empty mean, as the reference
  const cuda::Problem pb = make_problem(x, window, combine, alpha, beta, gamma, data_range);
  if (save_partials) check_launch("aw_ssim (its backward)", cuda::prepare_backward(kernel_dtype(x.scalar_type()), pb), window);
  Tensor workspace = at::empty({cuda::forward_workspace_elems(pb)}, acc);
  const cudaError_t err = cuda::launch_forward(kernel_dtype(x.scalar_type()), x.data_ptr(), y.data_ptr(),
                                               sigma.data_ptr<double>(), pb, score.data_ptr(),
                                               return_map ? map.data_ptr() : nullptr,
                                               save_partials ? part.data_ptr() : nullptr, workspace.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream());
  check_launch("aw_ssim", err, window);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {score, map, part};
}

std::tuple<Tensor, Tensor> aw_ssim_backward_cuda(const Tensor& grad_score_in, const Tensor& grad_map_in,
                                                 const Tensor& x_in, const Tensor& y_in, const Tensor& sigma_in,
                                                 const Tensor& partials_in, double alpha, double beta, double gamma,
                                                 int64_t window, int64_t combine, double data_range,
                                                 std::array<bool, 2> output_mask) {
  check_inputs("aw_ssim_backward", x_in, y_in, sigma_in, window, combine);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor y = y_in.contiguous();
  const Tensor sigma = sigma_in.to(at::kDouble).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HO = H - window + 1, WO = W - window + 1;
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(grad_score_in.device() == x.device() && grad_score_in.dim() == 1 && grad_score_in.size(0) == B,
              "aw_ssim_backward: grad_score must be [B] with B=", B, " on ", x.device(), ", got ", grad_score_in.sizes(),
              " on ", grad_score_in.device());
  const bool has_gmap = grad_map_in.numel() > 0;
  TORCH_CHECK(!has_gmap || (grad_map_in.device() == x.device() && grad_map_in.sizes() == at::IntArrayRef({B, C, HO, WO})),
              "aw_ssim_backward: grad_map must be empty or [B, C, H-K+1, W-K+1] = [", B, ", ", C, ", ", HO, ", ", WO,
              "], got ", grad_map_in.sizes());
  Tensor grad_x = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor grad_y = output_mask[1] ? at::empty_like(y) : at::empty({0}, y.options());
  if (B * C == 0 || !(output_mask[0] || output_mask[1])) return {grad_x.zero_(), grad_y.zero_()};
  Tensor part = partials_in;
  if (part.numel() == 0) {
    // The forward ran without saving the partials: recompute them.
    part = std::get<2>(aw_ssim_cuda(x, y, sigma, alpha, beta, gamma, window, combine, data_range, false, true));
  } else {
    TORCH_CHECK(part.device() == x.device() && part.sizes() == at::IntArrayRef({B, C, kStats, HO, WO}),
                "aw_ssim_backward: partials must be [B, C, 5, H-K+1, W-K+1] = [", B, ", ", C, ", 5, ", HO, ", ", WO,
                "], got ", part.sizes());
  }
  part = part.to(acc).contiguous();
  const Tensor grad_score = grad_score_in.to(x.scalar_type()).contiguous();
  const Tensor grad_map = has_gmap ? grad_map_in.to(x.scalar_type()).contiguous() : Tensor();
  const cuda::Problem pb = make_problem(x, window, combine, alpha, beta, gamma, data_range);
  const cudaError_t err = cuda::launch_backward(
      kernel_dtype(x.scalar_type()), grad_score.data_ptr(), has_gmap ? grad_map.data_ptr() : nullptr, x.data_ptr(),
      y.data_ptr(), sigma.data_ptr<double>(), part.data_ptr(), pb, output_mask[0] ? grad_x.data_ptr() : nullptr,
      output_mask[1] ? grad_y.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  check_launch("aw_ssim_backward", err, window);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace aw_ssim
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CUDA, m) {
  m.impl("aw_ssim", &defect_fast::aw_ssim::aw_ssim_cuda);
  m.impl("aw_ssim_backward", &defect_fast::aw_ssim::aw_ssim_backward_cuda);
}
